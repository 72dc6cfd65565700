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


def test_summary_is_torchinfo_table():
    text = models.summary("resnet")
    assert "Total params: 2,629,706" in text and "BasicBlock" in text


def test_loading_another_arch_says_which_it_is():
    state = models.build("resnet").state_dict()
    with pytest.raises(CheckpointError, match="does not fit arch=resnet2 .it holds a resnet model."):
        models.load_state(models.build("resnet2"), state, "resnet2", "x")
    assert models.guess_arch(models.build("vgg").state_dict()) == "vgg"
