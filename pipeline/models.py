"""The seed's three networks, built from torchvision's resnet18 / vgg16 parts.

The seed copies layers out of one global `resnet18_`, so two models built in one process share
parameters. Here each model builds its own resnet18 / vgg16 and keeps only what it uses.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from .errors import CheckpointError

INPUT_SHAPE = (3, 28, 28)


class MyResNet(nn.Module):
    """conv3x3(3->64)+BN+ReLU, resnet18 layer2 and layer3, avgpool, Linear(256, 10)."""

    def __init__(self):
        super().__init__()
        self.base = tvm.resnet18()  # dropped at the end of __init__: only the parts used stay
        self.block1 = nn.Sequential(nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False),
                                    self.base.bn1, self.base.relu)  # the seed drops the max-pool
        self.block2 = self.base.layer2
        self.block3 = self.base.layer3
        self.avgpool = self.base.avgpool
        self.fc = nn.Linear(256, 10)
        del self.base

    def blocks(self, x):
        return self.block3(self.block2(self.block1(x)))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.blocks(x)), 1))


class MyResNet2(MyResNet):
    """MyResNet plus resnet18's layer4: 4x4 final maps, Linear(512, 10)."""

    def __init__(self):
        super().__init__()
        self.block4 = tvm.resnet18().layer4
        self.fc = nn.Linear(512, 10)

    def blocks(self, x):
        return self.block4(super().blocks(x))


class MyVgg(nn.Module):
    """vgg16 features[0:9] + conv3x3(128->128)+ReLU+MaxPool, avgpool 7x7, vgg16's classifier."""

    def __init__(self):
        super().__init__()
        with torch.device("meta"):  # no memory and no init for vgg16's 138M weights: MyVgg keeps 17M
            base = tvm.vgg16()      # (initialising them all took 2 s of every build on a 2-core CPU)
        kept = nn.Sequential(*base.features[0:9], *base.classifier[1:6])
        init_as_vgg16(kept.to_empty(device=torch.get_default_device()))
        self.features = nn.Sequential(*base.features[0:9],
                                      nn.Conv2d(128, 128, kernel_size=3, stride=1, padding=1),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
        self.avgpool = base.avgpool
        self.fc = nn.Sequential(nn.Linear(7 * 7 * 128, 4096), *base.classifier[1:6], nn.Linear(4096, 10))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def init_as_vgg16(layers: nn.Module) -> None:
    """The weights torchvision's VGG.__init__ gives these layers (its init_weights=True)."""
    for m in layers.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


ARCHITECTURES = {"resnet": MyResNet, "vgg": MyVgg, "resnet2": MyResNet2}


def build(arch: str) -> nn.Module:
    return ARCHITECTURES[arch]()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(arch: str, batch: int = 10) -> str:
    """torchinfo's table at input (batch, 3, 28, 28), as the seed prints it."""
    from torchinfo import summary as torchinfo_summary

    return str(torchinfo_summary(build(arch), input_size=(batch, *INPUT_SHAPE), depth=2,
                                 device="cpu", verbose=0))


def load_state(model: nn.Module, state: dict, arch: str, source: str) -> None:
    """Load a state_dict, or say in one line that it belongs to another architecture."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        found = guess_arch(state)
        raise CheckpointError(
            f"checkpoint {source} does not fit arch={arch}"
            + (f" (it holds a {found} model)" if found else "")
            + f": use -P arch={found or '<its arch>'} or another parent run") from None


def guess_arch(state: dict) -> str | None:
    for name, cls in ARCHITECTURES.items():
        expected = {k: v.shape for k, v in cls().state_dict().items()}
        if expected.keys() == state.keys() and all(state[k].shape == s for k, s in expected.items()):
            return name
    return None
