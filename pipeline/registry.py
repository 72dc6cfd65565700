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


# Versions this process registered, withdrawn if the run fails afterwards.
REGISTERED: list[tuple[str, str, str | None]] = []  # (model name, version, previous champion)


def held_out(dataset: data_mod.SVHNData) -> data_mod.Split:
    """The data a champion is judged on: validation when held out, else test (the seed's)."""
    return dataset.val if dataset.val is not None else dataset.test


def accuracy(model, part: data_mod.Split) -> float:
    from .predict import probabilities

    predicted = probabilities(model, part.images.permute(0, 2, 3, 1).numpy()).argmax(1)
    return 100.0 * float((predicted == part.labels.numpy()).mean())


def no_champion(err: MlflowException) -> bool:
    """The model or its alias does not exist yet (any other error is a failed read)."""
    return err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in err.message)


def judge_champion(name: str, part: data_mod.Split) -> tuple[str | None, float | None, str]:
    """(version, its accuracy on `part`, problem): the current champion evaluated on this run's
    data. No champion: (None, None, ""). A failed read or load: the problem, never a figure."""
    import mlflow

    try:
        version = tracking.client().get_model_version_by_alias(name, CHAMPION).version
    except MlflowException as err:
        tracking.raise_if_refused(err)
        if no_champion(err):
            return None, None, ""
        return None, None, f"the current champion could not be read ({str(err).splitlines()[0][:160]})"
    try:
        model = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu")
        return version, accuracy(model, part), ""
    except Exception as err:  # noqa: BLE001 - any failure to load or run it: the alias stays
        tracking.raise_if_refused(err)
        reason = str(err).splitlines()[0][:160] if str(err) else ""
        return version, None, f"champion version {version} could not be loaded ({type(err).__name__}: {reason})"


def register(run_id: str, cfg: Config, best, dataset: data_mod.SVHNData) -> str:
    """Log `best`'s checkpoint (copied to `run_id`) as a model of run `run_id`, register it as
    cfg.registered_model, and move the champion alias to it only if it beats the current
    champion on this run's held-out data, both evaluated here, on the same images."""
    import mlflow
    from mlflow.models import infer_signature

    model = classifier_from_run(run_id, best.arch)
    part = held_out(dataset)
    challenger_acc = accuracy(model, part)
    champion, champion_acc, problem = judge_champion(cfg.registered_model, part)
    example = dataset.test_images[:4].permute(0, 2, 3, 1).contiguous().numpy()  # batch > 1 for pt2
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    client = tracking.client()
    info = mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature,
                                    serialization_format="pt2", run_id=run_id,  # no fluent run
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                      f"numpy=={np.__version__}"])
    split = part.role
    judged = f"{split} split ({len(part.labels)} images, digest {part.digest[:12]})"
    tags = {f"best_{best.selected_on}_acc": repr(best.best_acc), "selected_on": best.selected_on,
            "test_acc_at_best": repr(best.test_acc_at_best), "data_digest": dataset.digest,
            "judged_on": split, "judged_on_digest": part.digest, "judged_acc": repr(challenger_acc),
            "arch": best.arch, "stage": cfg.stage}
    version = mlflow.register_model(info.model_uri, cfg.registered_model, tags=tags).version
    REGISTERED.append((cfg.registered_model, version, champion))
    client.set_tag(run_id, "registered_model_version", f"{cfg.registered_model}/{version}")
    mine = f"version {version} {challenger_acc:.3f}%"
    if problem:
        print(f"registered {cfg.registered_model} version {version}; alias '{CHAMPION}' not moved: {problem}",
              flush=True)
    elif champion is None or challenger_acc > champion_acc:
        client.set_registered_model_alias(cfg.registered_model, CHAMPION, version)
        than = f" over version {champion} {champion_acc:.3f}%" if champion else " (the first)"
        print(f"registered {cfg.registered_model} {mine}{than} on the {judged}: alias '{CHAMPION}' "
              f"moved to version {version}", flush=True)
    else:
        print(f"registered {cfg.registered_model} {mine} vs champion version {champion} "
              f"{champion_acc:.3f}% on the {judged}: alias '{CHAMPION}' stays on version {champion}",
              flush=True)
    return version


def withdraw() -> None:
    """Remove the versions this process registered (the run failed after registering), and put
    the champion alias back where it was."""
    client = tracking.client()
    while REGISTERED:
        name, version, previous = REGISTERED.pop()
        try:
            client.delete_model_version(name, version)
            if previous:
                client.set_registered_model_alias(name, CHAMPION, previous)
            print(f"withdrew {name} version {version}: its run did not finish", flush=True)
        except MlflowException as err:
            print(f"could not withdraw {name} version {version} ({str(err).splitlines()[0][:120]}): "
                  f"delete it by hand", flush=True)
