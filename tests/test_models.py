"""The seed's networks: parameter counts, independent parameters, checkpoint checks."""
import pytest
import torch

from pipeline import models
from pipeline.models import CheckpointError


@pytest.mark.parametrize("arch,count", [("resnet", 2_629_706), ("vgg", 42_924_234),
                                        ("resnet2", 11_025_994)])
def test_parameter_counts_match_the_seed(arch, count):
    model = models.build(arch)
    assert models.count_parameters(model) == count
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)


def test_each_instance_owns_its_parameters():
    # the seed copies layers out of one global resnet18_, so its models share weights
    a, b = models.build("resnet"), models.build("resnet")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(pa[k].data_ptr() != pb[k].data_ptr() for k in pa)
    with torch.no_grad():
        a.block2[0].conv1.weight.zero_()
    assert b.block2[0].conv1.weight.abs().sum() > 0


def test_vgg_gives_the_layers_it_takes_from_vgg16_the_weights_torchvision_gives_them():
    """MyVgg builds vgg16 on the meta device and initialises only the layers it keeps. Those carry
    torchvision's VGG init (kaiming normal, fan_out, for convs; N(0, 0.01) for Linear; zero
    biases); the layers MyVgg adds keep PyTorch's default, uniform within 1/sqrt(fan_in)."""
    torch.manual_seed(0)
    vgg = models.build("vgg")
    taken = {"features.0": (2 / (64 * 9)) ** 0.5, "features.2": (2 / (64 * 9)) ** 0.5,
             "features.5": (2 / (128 * 9)) ** 0.5, "features.7": (2 / (128 * 9)) ** 0.5, "fc.3": 0.01}
    added = {"features.9": 128 * 9, "fc.0": 6272, "fc.6": 4096}  # fan_in
    layers = dict(vgg.named_modules())
    assert {name for name, m in layers.items() if list(m.parameters(recurse=False))} == taken.keys() | added.keys()
    for name, module in layers.items():
        for kind, p in module.named_parameters(recurse=False):
            assert p.device.type == "cpu" and p.dtype == torch.float32, f"{name}.{kind}"
            std = taken[name] if name in taken else (3 * added[name]) ** -0.5
            if name in taken and kind == "bias":
                assert not p.any(), f"{name}.{kind}"
                continue
            # a sample's spread is within 5 standard errors of the law's
            assert p.std().item() == pytest.approx(std, rel=5 / (2 * p.numel()) ** 0.5), f"{name}.{kind}"
            assert abs(p.mean().item()) < 5 * std / p.numel() ** 0.5, f"{name}.{kind}"


def test_summary_is_torchinfo_table():
    text = models.summary("resnet")
    assert "Total params: 2,629,706" in text and "BasicBlock" in text


def test_loading_another_arch_says_which_it_is():
    state = models.build("resnet").state_dict()
    with pytest.raises(CheckpointError, match="does not fit arch=resnet2 .it holds a resnet model."):
        models.load_state(models.build("resnet2"), state, "resnet2", "x")
    assert models.guess_arch(models.build("vgg").state_dict()) == "vgg"


def test_feature_maps_have_the_seed_shapes():
    # the seed's layers: block1 keeps 28x28, layer2 and layer3 halve it, layer4 halves again
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        resnet, resnet2, vgg = (models.build(a).eval() for a in ("resnet", "resnet2", "vgg"))
        assert resnet.block1(x).shape == (2, 64, 28, 28)
        assert resnet.blocks(x).shape == (2, 256, 7, 7)
        assert resnet2.blocks(x).shape == (2, 512, 4, 4)
        assert vgg.features(x).shape == (2, 128, 7, 7)
        assert vgg.avgpool(vgg.features(x)).shape == (2, 128, 7, 7)
    assert resnet.block1[0].bias is None and resnet.block1[0].kernel_size == (3, 3)
    assert [type(m).__name__ for m in resnet.block1] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert resnet.fc.in_features == 256 and resnet2.fc.in_features == 512
    assert (vgg.fc[0].in_features, vgg.fc[-1].out_features) == (6272, 10)
    # vgg16 features[0:9] + conv+ReLU+pool; Linear, vgg16's classifier[1:6] (ReLU, Dropout, Linear,
    # ReLU, Dropout), Linear
    assert [type(m).__name__ for m in vgg.features] == \
        ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Conv2d", "ReLU",
         "Conv2d", "ReLU", "MaxPool2d"]
    assert [type(m).__name__ for m in vgg.fc] == \
        ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]


def test_forward_is_the_blocks_then_pool_and_linear():
    model = models.build("resnet2").eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model.fc(model.block4(model.block3(model.block2(model.block1(x)))).mean((2, 3)))
        assert torch.allclose(model(x), expected, atol=1e-5)
        vgg = models.build("vgg").eval()
        assert torch.allclose(vgg(x), vgg.fc(torch.flatten(vgg.avgpool(vgg.features(x)), 1)), atol=1e-6)


def test_summary_shows_the_seed_batch_of_ten_at_depth_two(capsys):
    text = models.summary("resnet")
    assert capsys.readouterr().out == ""  # returned, not printed
    assert "[10, 64, 28, 28]" in text and "BasicBlock: 2-7" in text and "3-1" not in text
    assert "[4, 256, 7, 7]" in models.summary("resnet", batch=4)


def test_guess_arch_is_none_for_a_foreign_state():
    state = models.build("resnet").state_dict()
    state.pop("fc.bias")
    assert models.guess_arch(state) is None
    with pytest.raises(CheckpointError) as err:
        models.load_state(models.build("resnet"), state, "resnet", "run/x.pt")
    assert str(err.value) == ("checkpoint run/x.pt does not fit arch=resnet: "
                              "use -P arch=<its arch> or another parent run")
    resized = models.build("resnet").state_dict()
    resized["fc.weight"] = torch.zeros(11, 256)
    assert models.guess_arch(resized) is None
