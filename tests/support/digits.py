"""Data and models with known answers: colour-coded digits a resnet learns in two epochs, a run
whose model answers one digit, and a tiny linear task for the training loop."""
from __future__ import annotations

import numpy as np
import torch


def colour_images(count, seed):
    """SVHN-format images a resnet learns within two epochs: each digit its own colour, plus noise."""
    labels = np.arange(count) % 10
    palette = np.random.default_rng(0).integers(0, 256, (10, 3))
    noise = np.random.default_rng(seed).normal(0, 20, (32, 32, 3, count))
    images = np.clip(palette[labels].T[None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels


def svhn_labels(digits):
    return np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]


def colour_params(store, colour_data, folder, extra):
    # cpu and fp32, so this process can repeat the run's evaluation exactly; all of the colour
    # set (256 and 128 images, not TINY's limits): its tests are calibrated on it
    return store.params({"dataset": "svhn", "verify": "false", "data_dir": str(colour_data / folder),
                         "device": "cpu", "precision": "fp32", "bs": "32", "limit_train": "256",
                         "limit_test": "128", **extra})


def constant_model_run(store, digit: int, lineage: str, stage: str = "smoke", diverged: bool = False) -> str:
    """A run (in this process's tracking store, which must be `store`'s) whose best.pt answers
    `digit` for every image: its accuracy is that digit's share. `lineage`: the data its weights
    descend from (a stage run's lineage_digest). `diverged`: its outputs are NaN, as after a
    diverged training (argmax reads a NaN row as digit 0)."""
    from pipeline import checkpoints, models

    net = models.build("resnet")
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.fill_(-10.0)
        net.fc.bias[digit] = float("nan") if diverged else 10.0
    experiment = store.client.get_experiment_by_name("Default").experiment_id
    run_id = store.client.create_run(experiment, tags={"stage": stage, "lineage_digest": lineage}).info.run_id
    checkpoints.save_checkpoint(run_id, checkpoints.BEST, net.state_dict())
    return run_id


class Tiny(torch.nn.Module):
    """A linear model for train.fit's unit tests: it learns `batches` in a few epochs."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(x)


def batches(seed, n=64, bs=16):
    """Tiny's task; bs=24 leaves a short last batch (a second static shape for torch.compile)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() * 3  # learnable: class 0 or 3
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
