"""The seed's transforms, on two pipelines.

`tensor` (default): batches are cropped, rotated and normalised as whole tensors on the training
device.
`torchvision`: the seed's own path, the images torchvision's SVHN dataset serves (taken from the
same decoded tensors, so no worker opens a .mat) with per-sample PIL transforms in a DataLoader,
kept for comparison (benchmarks/throughput.py).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .config import Config
from .data import Split, SVHNData

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP = 28
MAX_ANGLE = 30.0

# -- the seed's transforms on whole batches ---------------------------------------------------

# made once per device: torch.tensor(..., device="cuda") per batch is a blocking copy, a host sync
MEAN_STD_ON: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0,1] float (B,3,H,W) -> normalised float, as ToTensor + Normalize."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if images.device not in MEAN_STD_ON:
        MEAN_STD_ON[images.device] = (torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1),
                                      torch.tensor(STD, device=images.device).view(1, 3, 1, 1))
    mean, std = MEAN_STD_ON[images.device]
    return (images - mean) / std


def center_crop(images: torch.Tensor, size: int = CROP) -> torch.Tensor:
    top = (images.shape[-2] - size) // 2  # CenterCrop rounds the same way for 32 -> 28
    left = (images.shape[-1] - size) // 2
    return images[..., top:top + size, left:left + size]


def sample_augment_params(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-image crop offsets (0..4, as RandomCrop(28) on 32) and angles in [-30, 30]."""
    tops = torch.randint(0, 32 - CROP + 1, (batch,), generator=generator)
    lefts = torch.randint(0, 32 - CROP + 1, (batch,), generator=generator)
    angles = torch.rand(batch, generator=generator) * (2 * MAX_ANGLE) - MAX_ANGLE
    return tops, lefts, angles


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device` without a host sync: a plain .to("cuda") from pageable
    memory waits for the GPU to drain, once per batch; from pinned memory it is queued."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(28) then RandomRotation([-30, 30]) (nearest, fill 0), each image its own draw.

    uint8 (B,3,32,32) on any device -> float (B,3,28,28) in [0,1]; no per-sample Python.
    """
    batch, device = images.shape[0], images.device
    tops, lefts, angles = (to_device_async(t, device) for t in sample_augment_params(batch, generator))
    offsets = torch.arange(CROP, device=device)
    rows = (tops[:, None] + offsets)[:, None, :, None]
    cols = (lefts[:, None] + offsets)[:, None, None, :]
    crops = images[torch.arange(batch, device=device)[:, None, None, None],
                   torch.arange(3, device=device)[None, :, None, None], rows, cols]
    radians = angles * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    # torchvision rotates counter-clockwise; grid_sample maps output -> input, hence the signs
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, [batch, 3, CROP, CROP], align_corners=False)
    return F.grid_sample(crops.float().div_(255), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)


class TensorBatches:
    """Batches from uint8 tensors: shuffled with `generator`, augmented and normalised as tensors."""

    def __init__(self, images, labels, bs, *, train, augment_images, device, generator=None,
                 channels_last=False):
        self.images, self.labels = images, labels
        self.bs, self.train, self.augment_images = bs, train, augment_images
        self.device, self.generator, self.channels_last = device, generator, channels_last
        if device.type == "cuda":  # resident on the GPU: no host->device copy per batch
            self.images = images.to(device, non_blocking=True)
            self.labels = labels.to(device, non_blocking=True)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.bs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        order = to_device_async(order, self.images.device)
        for start in range(0, n, self.bs):
            index = order[start:start + self.bs]
            x = self.images[index].to(self.device, non_blocking=True)
            y = self.labels[index].to(self.device, non_blocking=True)
            if self.train and self.augment_images:
                x = normalise(augment(x, self.generator))
            else:
                x = normalise(center_crop(x))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


# -- the seed's own pipeline -------------------------------------------------------------------

def seed_transforms(train: bool, augment_images: bool = True) -> T.Compose:
    crop = [T.RandomCrop(CROP), T.RandomRotation(degrees=[-MAX_ANGLE, MAX_ANGLE])] \
        if train and augment_images else [T.CenterCrop(CROP)]
    return T.Compose([*crop, T.ToTensor(), T.Normalize(mean=MEAN, std=STD)])


class SeedImages(torch.utils.data.Dataset):
    """A split's decoded uint8 images as torchvision's SVHN dataset serves them (same PIL image,
    same transform, same int label), read from memory: a Ray worker has no .mat to open."""

    def __init__(self, part: Split, transform):
        self.images, self.labels, self.transform = part.images.numpy(), part.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(np.transpose(self.images[index], (1, 2, 0)))  # as SVHN.__getitem__
        return self.transform(image), int(self.labels[index])


class LoaderBatches:
    """The seed's per-sample PIL transforms + DataLoader, over the decoded split."""

    def __init__(self, part: Split, bs, *, train, augment_images, device,
                 generator=None, num_workers=0, channels_last=False):
        dataset = SeedImages(part, seed_transforms(train, augment_images))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=bs, shuffle=train, drop_last=False, num_workers=num_workers,
            generator=generator, pin_memory=device.type == "cuda")
        self.device, self.channels_last = device, channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def batches(cfg: Config, data: SVHNData, split: str, device: torch.device, bs: int,
            generator: torch.Generator | None = None, channels_last: bool = False):
    """The train, val or test batches of `data` on the pipeline `cfg.data_pipeline` names."""
    train = split == "train"
    part = {"train": data.train, "val": data.val, "test": data.test}[split]
    if cfg.data_pipeline == "torchvision":
        return LoaderBatches(part, bs, train=train, augment_images=cfg.augment,
                             device=device, generator=generator, num_workers=cfg.num_workers,
                             channels_last=channels_last)
    return TensorBatches(part.images, part.labels, bs, train=train, augment_images=cfg.augment,
                         device=device, generator=generator, channels_last=channels_last)
