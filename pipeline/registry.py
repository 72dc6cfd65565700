"""Model registry: log the stage's best model, register it, and move `champion` only on a gain.

The logged model is a `Classifier`: the trained network with the seed's test transform inside,
so it takes uint8 images (N, 32, 32, 3) exactly as SVHN stores them and returns class
probabilities (N, 10). It is saved in MLflow's pt2 (torch.export) format, which loads in a
fresh process without this project's source, through mlflow.pytorch and mlflow.pyfunc alike,
and serves as is with `mlflow models serve`.
"""
from __future__ import annotations

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from torch import nn

from . import data as data_mod
from . import models, tracking
from .config import Config

CHAMPION = "champion"


class Classifier(nn.Module):
    """uint8 (N,32,32,3) images -> probabilities (N,10); center crop 28 and normalise inside."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(data_mod.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data_mod.STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = x[:, :, 2:30, 2:30]  # CenterCrop(28) of 32x32
        return torch.softmax(self.net((x - self.mean) / self.std), dim=1)


def classifier_from_run(run_id: str, arch: str) -> Classifier:
    net = models.build(arch)
    models.load_state(net, tracking.load_weights(run_id), arch, f"{run_id}/{tracking.BEST}")
    return Classifier(net).eval()


def champion_accuracy(name: str, split: str) -> tuple[str | None, float]:
    """(version, best accuracy on `split`) of the current champion, or (None, -inf)."""
    try:
        version = tracking.client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        tracking.raise_if_refused(err)
        return None, float("-inf")
    return version.version, float(version.tags.get(f"best_{split}_acc", "-inf"))


def register(run_id: str, cfg: Config, best, dataset: data_mod.SVHNData) -> str:
    """Log `best`'s checkpoint (copied to `run_id`) as a model of run `run_id`, register it as
    cfg.registered_model, and give it the champion alias if it beats the current champion."""
    import mlflow
    from mlflow.models import infer_signature

    model = classifier_from_run(run_id, best.arch)
    example = dataset.test_images[:4].permute(0, 2, 3, 1).contiguous().numpy()  # batch > 1 for pt2
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    client = tracking.client()
    info = mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature,
                                    serialization_format="pt2", run_id=run_id,  # no fluent run
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                      f"numpy=={np.__version__}"])
    split = best.selected_on  # the champion is compared on the split every other choice used
    previous_version, previous_acc = champion_accuracy(cfg.registered_model, split)
    version = mlflow.register_model(info.model_uri, cfg.registered_model,
                                    tags={f"best_{split}_acc": repr(best.best_acc), "selected_on": split,
                                          "test_acc_at_best": repr(best.test_acc_at_best),
                                          "data_digest": dataset.digest,
                                          "arch": best.arch, "stage": cfg.stage}).version
    client.set_tag(run_id, "registered_model_version", f"{cfg.registered_model}/{version}")
    if best.best_acc > previous_acc:
        client.set_registered_model_alias(cfg.registered_model, CHAMPION, version)
        print(f"registered {cfg.registered_model} version {version} ({split}_acc {best.best_acc:.3f}%) "
              f"and moved alias '{CHAMPION}' to it"
              + (f" from version {previous_version} ({previous_acc:.3f}%)" if previous_version else ""),
              flush=True)
    else:
        print(f"registered {cfg.registered_model} version {version} ({split}_acc {best.best_acc:.3f}%); "
              f"alias '{CHAMPION}' stays on version {previous_version} ({previous_acc:.3f}%), "
              f"which is at least as accurate", flush=True)
    return version
