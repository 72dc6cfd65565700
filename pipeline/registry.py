"""Model registry: log the stage's best model, register it, and move `champion` only on a gain.

The logged model is a `Classifier`: the trained network with the seed's test transform inside,
so it takes uint8 images (N, 32, 32, 3) exactly as SVHN stores them and returns class
probabilities (N, 10). It is saved in MLflow's pt2 (torch.export) format, which loads in a
fresh process without this project's source, through mlflow.pytorch and mlflow.pyfunc alike,
and serves as is with `mlflow models serve`.
"""
from __future__ import annotations

import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from torch import nn

from . import data as data_mod
from . import batching, checkpoints, models, tracking
from .config import STAGES, Config, registers
from .errors import ModelRefused, first_line

CHAMPION = "champion"
# a version's tag: the champion when it was registered, where withdrawing it puts the alias back
CHAMPION_BEFORE = "champion_before"
# a version's tag: "true" when registering it created its registered model, which withdrawing the
# last version deletes again (a failed run leaves no registered model behind)
CREATED_MODEL = "created_model"


class Registered(NamedTuple):
    """A version a stage registered, as withdraw() needs it."""
    name: str
    version: str
    previous: str | None  # the champion when it was registered
    created: bool         # registering it created the registered model


class Classifier(nn.Module):
    """uint8 (N,32,32,3) images -> probabilities (N,10); center crop 28 and normalise inside."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(batching.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(batching.STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = x[:, :, 2:30, 2:30]  # CenterCrop(28) of 32x32
        return torch.softmax(self.net((x - self.mean) / self.std), dim=1)


def classifier_from_run(run_id: str, arch: str) -> Classifier:
    net = models.build(arch)
    models.load_state(net, checkpoints.load_weights(run_id), arch, f"{run_id}/{checkpoints.BEST}")
    return Classifier(net).eval()


PT2 = "pt2"


def model_label(model_uri: str) -> str:
    """'model NAME version V' for a models:/NAME/V URI, else 'model URI'."""
    found = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    return f"model {found.group(1)} version {found.group(2)}" if found else f"model {model_uri}"


def pinned(model_uri: str) -> str:
    """models:/NAME@ALIAS as models:/NAME/VERSION, so what is checked, loaded and named is one
    version even if the alias moves meanwhile; any other URI as it is."""
    found = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri)
    if not found:
        return model_uri
    return f"models:/{found.group(1)}/{tracking.client().get_model_version_by_alias(*found.groups()).version}"


def stored_format(local: Path) -> str:
    """How the downloaded model at `local` is stored, read from its MLmodel and file list (nothing
    loaded): pt2 (torch.export: a graph and tensors), pickle (torch.save of the module: unpickling
    runs code), or what else makes it unusable here. No MLmodel at all: FileNotFoundError (a
    model that cannot be read, not one refused for its format)."""
    text = (local / "MLmodel").read_text()
    try:
        flavor = (yaml.safe_load(text) or {}).get("flavors", {}).get("pytorch")
    except (yaml.YAMLError, AttributeError):
        return "an unreadable"
    if not isinstance(flavor, dict):
        return "a non-pytorch"
    if flavor.get("code"):  # a code folder is put on sys.path at load: it runs
        return "pytorch with a code folder"
    folder = local / str(flavor.get("model_data", "data"))
    if not folder.resolve().is_relative_to(local.resolve()):  # an absolute or ../ path: elsewhere
        return "an outside-the-model data path"
    files = {f.name for f in folder.iterdir()} if folder.is_dir() else set()
    if "model.pth" in files:
        return "pickle"
    return PT2 if "model.pt2" in files else "an unknown"


def load_pt2(model_uri: str):
    """The model at `model_uri`, loaded only when stored as pt2: a pickle-format model (or one with
    a code folder) is refused before anything of it is read. It is downloaded once, checked and
    loaded from that one copy (nothing can be swapped in between), and MLflow then checks that the
    pt2 archive holds no pickle (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, which importing pipeline sets)."""
    import mlflow

    model_uri = pinned(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        fmt = stored_format(local)
        if fmt != PT2:
            raise ModelRefused(
                f"{model_label(model_uri)} ({model_uri}) is stored in {fmt} format, not pt2: loading it "
                f"could run code from the store, so it was refused unread; register a pt2 model (retrain or "
                f"deepen log one), or load this one yourself if you trust whoever saved it")
        return mlflow.pytorch.load_model(str(local), map_location="cpu")


def probabilities(model, images: np.ndarray, bs: int = 256) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), bs):
            out.append(model(torch.from_numpy(np.ascontiguousarray(images[start:start + bs]))).numpy())
    return np.concatenate(out) if out else np.zeros((0, 10), dtype=np.float32)


def held_out(dataset: data_mod.SVHNData) -> data_mod.Split:
    """The data a champion is judged on: validation when held out, else test (the seed's)."""
    return dataset.val if dataset.val is not None else dataset.test


def not_finite(probs: np.ndarray) -> int:
    """How many images' outputs hold NaN or inf (diverged weights): argmax reads such a row as
    digit 0, a figure that can win, so no figure is taken from them."""
    return int((~np.isfinite(probs)).any(axis=1).sum()) if len(probs) else 0


def accuracy(model, part: data_mod.Split) -> float:
    """Percent of `part` read right; nan over no images, or when any output is not finite."""
    probs = probabilities(model, part.images.permute(0, 2, 3, 1).numpy())
    if not_finite(probs):
        return math.nan
    return 100.0 * float((probs.argmax(1) == part.labels.numpy()).mean())


def no_champion(err: MlflowException) -> bool:
    """The model or its alias does not exist yet (any other error is a failed read)."""
    return err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in err.message)


def model_exists(name: str) -> bool:
    try:
        tracking.client().get_registered_model(name)
        return True
    except MlflowException as err:
        tracking.raise_if_refused(err)
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def current_champion(name: str):
    """The version the alias points at now, or None when the model or its alias does not exist."""
    try:
        return tracking.client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        tracking.raise_if_refused(err)
        if no_champion(err):
            return None
        raise


def incomparable(champion, dataset: data_mod.SVHNData, part: data_mod.Split) -> str:
    """Why `champion` cannot be judged against this run's challenger on `part` ("" when it can):
    both must come from the same data (digest: files, limits, validation split, data seed), so
    `part` is held out for both and both were meant for it."""
    tags = champion.tags
    mine = dataset.digest[:12]
    if "data_digest" not in tags or "judged_on" not in tags or tracking.LINEAGE_DIGEST not in tags:
        return (f"champion version {champion.version} records no data digest or lineage, so nothing is "
                f"known to be held out for it")
    if tags["data_digest"] != dataset.digest:
        return (f"champion version {champion.version} was trained on other data (digest "
                f"{tags['data_digest'][:12]}, this run {mine}): no split is known to be held out for both")
    if tags[tracking.LINEAGE_DIGEST] != dataset.digest:
        return (f"champion version {champion.version} grew out of weights trained on other data "
                f"({tags[tracking.LINEAGE_DIGEST][:12]}): this run's held-out images may not be held out for it")
    if tags["judged_on"] != part.role or tags.get("judged_on_digest", part.digest) != part.digest:
        return (f"champion version {champion.version} was judged on its {tags['judged_on']} split, this run "
                f"on the {part.role} split")
    return ""


def judge_champion(champion, part: data_mod.Split) -> tuple[float | None, str]:
    """(the champion's accuracy on `part`, problem): evaluated here, in this run. A failed load
    or a refused format: the problem, never a figure."""
    uri = f"models:/{champion.name}/{champion.version}"
    try:
        return accuracy(load_pt2(uri), part), ""
    except ModelRefused as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - any failure to load or run it: the alias stays
        tracking.raise_if_refused(err)
        return None, f"champion version {champion.version} could not be loaded ({type(err).__name__}: {first_line(err)})"


def promoter() -> str:
    import getpass

    from mlflow.utils.credentials import read_mlflow_creds

    try:
        local = f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        local = f"uid {os.getuid()}@{socket.gethostname()}"
    user = read_mlflow_creds().username
    return f"{local} (tracking user {user})" if user else local


def move_alias(name: str, version: str, judged: str | None) -> str:
    """Point the alias at `version` if it still points where this run judged (`judged`: that
    version, or None for no champion); else leave it and say why. MLflow has no compare-and-set
    for aliases: the alias is read again right before it is set, which narrows the window to
    two calls."""
    now = current_champion(name)
    now_version = str(now.version) if now is not None else None
    if now_version != judged:
        return (f"the alias moved to version {now_version} while this run judged "
                f"{'version ' + judged if judged else 'no champion'}: compare again, or promote by hand")
    tracking.client().set_registered_model_alias(name, CHAMPION, version)
    return ""


def compare_with(champion, lineage: str, dataset: data_mod.SVHNData,
                 part: data_mod.Split) -> tuple[float | None, str]:
    """(the champion's accuracy on `part`, "") when the challenger (whose weights descend from
    `lineage`) and the champion can be compared there, else (None, why not). A challenger whose
    weights may have trained on `part` never takes the alias, not even as the first champion.
    No champion: (None, "")."""
    if lineage != dataset.digest:  # its parent's data may hold `part`
        known = f"a parent trained on other data (lineage {lineage[:12]})" if lineage else \
            "a parent that records no lineage"
        return None, f"this run's weights grow out of {known}, so no split is known to be held out for it"
    if champion is None:
        return None, ""
    why = incomparable(champion, dataset, part)
    return (None, why) if why else judge_champion(champion, part)


def register(run_id: str, cfg: Config, best, dataset: data_mod.SVHNData, registered: list) -> str:
    """Log `best`'s checkpoint (copied to `run_id`) as a model of run `run_id`, register it as
    cfg.model_name, and move the champion alias to it only if it beats the current champion on
    held-out data meant for both (same data digest, same split), both evaluated here on the same
    images; or, with cfg.promote, whatever the figures, recording who promoted it.
    `registered` (the stage's, owned by the session) gets its Registered: withdraw(registered)
    removes it if the stage fails afterwards."""
    import mlflow
    from mlflow.models import infer_signature

    name = cfg.model_name
    model = classifier_from_run(run_id, best.arch)
    part = held_out(dataset)
    challenger_acc = accuracy(model, part)
    champion = current_champion(name)
    client = tracking.client()
    lineage = tracking.descends_from(client.get_run(run_id).data.tags)
    champion_acc, why = compare_with(champion, lineage, dataset, part)
    if champion_acc is not None and math.isnan(champion_acc) and len(part.labels):
        champion_acc = -math.inf  # a champion whose outputs are not finite: any finite figure beats it
    # over no images it compares with nothing; with outputs that are not finite it is never champion
    diverged = not math.isfinite(challenger_acc) and len(part.labels) > 0
    if diverged:
        why = (f"its outputs on the {part.role} split are not finite (NaN or inf: its weights diverged), "
               f"so it is never champion, not even with -P promote=true")
    elif not why and not math.isfinite(challenger_acc):
        why = f"its accuracy on the {part.role} split is not a number ({len(part.labels)} images)"
    # torch.export fixes a batch dimension it sees as 0 or 1: the example has 2 to 4 images (test
    # ones, or training ones where the test split is empty), so the pt2 model takes any batch
    images = dataset.test_images if dataset.n_test else dataset.train_images
    example = images[:4].repeat(2, 1, 1, 1)[:max(2, min(4, len(images)))]
    example = example.permute(0, 2, 3, 1).contiguous().numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    info = mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature,
                                    serialization_format="pt2", run_id=run_id,  # no fluent run
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                      f"numpy=={np.__version__}"])
    split = part.role
    judged = f"{split} split ({len(part.labels)} images, digest {part.digest[:12]})"
    tags = {f"best_{best.selected_on}_acc": repr(best.best_acc), "selected_on": best.selected_on,
            "test_acc_at_best": repr(best.test_acc_at_best), "data_digest": dataset.digest,
            "dataset": cfg.dataset, tracking.LINEAGE_DIGEST: lineage, "judged_on": split,
            "judged_on_digest": part.digest,
            "judged_acc": repr(challenger_acc), "arch": best.arch, "stage": cfg.stage}
    previous = str(champion.version) if champion is not None else None
    tags[CHAMPION_BEFORE] = previous or ""
    created = not model_exists(name)
    if created:
        tags[CREATED_MODEL] = "true"
    version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    registered.append(Registered(name, version, previous, created))
    client.set_tag(run_id, "registered_model_version", f"{name}/{version}")
    mine = f"version {version} {challenger_acc:.3f}%"
    by_hand = (f"to promote it anyway, run the stage with -P promote=true, or call MlflowClient()"
               f".set_registered_model_alias('{name}', '{CHAMPION}', '{version}')")
    if (not cfg.promote and why) or diverged:
        stays = f"stays on version {previous}" if previous else "is not set"
        print(f"registered {name} {mine}; alias '{CHAMPION}' {stays}: {why}" + ("" if diverged else f"; {by_hand}"),
              flush=True)
        return version
    if not cfg.promote and champion is not None and not challenger_acc > champion_acc:  # a nan never moves it
        print(f"registered {name} {mine} vs champion version {previous} "
              f"{champion_acc:.3f}% on the {judged}: alias '{CHAMPION}' stays on version {previous} "
              f"(it moves only on a strictly higher accuracy); {by_hand}", flush=True)
        return version
    moved_meanwhile = move_alias(name, version, previous)
    if moved_meanwhile:
        print(f"registered {name} {mine}; alias '{CHAMPION}' not moved: {moved_meanwhile}", flush=True)
    elif cfg.promote:
        who = promoter()
        client.set_model_version_tag(name, version, "promoted_by", who)
        client.set_model_version_tag(name, version, "promoted_over", previous or "")
        client.set_tag(run_id, "promoted_by", who)
        print(f"registered {name} {mine} on the {judged}: alias '{CHAMPION}' moved to version {version} "
              f"by -P promote=true ({who}), over {'version ' + previous if previous else 'no champion'}"
              f"{'; ' + why if why else ''}", flush=True)
    else:
        than = " (the first)" if not previous else f" over version {previous} " + (
            "(its outputs are not finite)" if champion_acc == -math.inf else f"{champion_acc:.3f}%")
        print(f"registered {name} {mine}{than} on the {judged}: alias '{CHAMPION}' "
              f"moved to version {version}", flush=True)
    return version


def withdraw_left_by(run) -> None:
    """Withdraw the versions an unfinished `run` registered and never withdrew (its process died at
    once: SIGKILL, out of memory, a lost machine), before the run that continues it registers the
    same weights again: a champion of a run that never finished is not left serving. Found by
    their run id, so one registered just before the kill, untagged on the run, is found too."""
    stage = run.data.tags.get("stage", "")
    if run.info.status == "FINISHED" or stage not in STAGES or not registers(stage):
        return
    try:
        left = tracking.client().search_model_versions(f"run_id = '{run.info.run_id}'")
    except MlflowException as err:
        tracking.raise_if_refused(err)
        print(f"could not look for versions run {run.info.run_id} left ({first_line(err, 120)}): check the "
              f"registry by hand", flush=True)
        return
    withdraw([Registered(v.name, str(v.version), v.tags.get(CHAMPION_BEFORE) or None,
                         v.tags.get(CREATED_MODEL) == "true") for v in left])


def withdraw(registered: list) -> None:
    """Remove the versions a stage registered (it failed after registering); the alias
    goes back to where it was only if it pointed at the withdrawn version (read right before)
    and the delete left it unset: an alias another run moved since is left where that run put it.
    A registered model that registering created goes too once it holds no version."""
    client = tracking.client()
    while registered:
        name, version, previous, created = registered.pop()
        try:
            now = current_champion(name)
            ours = now is not None and str(now.version) == version
            client.delete_model_version(name, version)  # deletes its aliases with it
        except MlflowException as err:
            print(f"could not withdraw {name} version {version} ({first_line(err, 120)}): "
                  f"delete it by hand", flush=True)
            continue
        back = ""
        if ours and previous:
            try:  # only if no other run moved it between that read and the delete (which unset it)
                if current_champion(name) is None:
                    client.set_registered_model_alias(name, CHAMPION, previous)
                    back = f"; alias '{CHAMPION}' back on version {previous}"
            except MlflowException as err:  # that version was deleted since, by hand; or the store refused
                back = (f"; alias '{CHAMPION}' not put back on version {previous} ({first_line(err, 120)}): "
                        f"it is unset")
        if created:
            back += delete_if_empty(name)
        print(f"withdrew {name} version {version}: its run did not finish{back}", flush=True)


def delete_if_empty(name: str) -> str:
    """Delete registered model `name` if it holds no version (another run's version keeps it):
    what was done, for withdraw's line."""
    client = tracking.client()
    try:
        if client.get_registered_model(name).latest_versions:
            return ""
        client.delete_registered_model(name)
    except MlflowException as err:
        return f"; registered model {name} not deleted ({first_line(err, 120)}): delete it by hand if empty"
    return f"; registered model {name} deleted (this run created it, and it holds no version now)"
