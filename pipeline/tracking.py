"""MLflow calls for training runs: params, metrics, checkpoints, lineage lookups and reuse."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import interrupts
from .config import PROJECT_DIR, Config, code_version

BEST = "checkpoints/best.pt"
LAST = "checkpoints/last.pt"


class LineageError(RuntimeError):
    """A parent or resume run that cannot be used: the message is the one line the user sees."""


def client() -> MlflowClient:
    return MlflowClient()


# -- the record every run carries --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def git_tags() -> dict[str, str]:
    """The checkout's commit (and whether it had uncommitted changes), when it is a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def environment_tags() -> dict[str, str]:
    """Versions and hardware, so a figure can be traced to what produced it."""
    import torchvision

    tags = {"env.python": platform.python_version(), "env.torch": torch.__version__,
            "env.torchvision": torchvision.__version__, "env.mlflow": mlflow.__version__,
            "env.cuda": torch.version.cuda or "none",
            "env.cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "none",
            "env.cpu": cpu_model(), "env.platform": platform.platform()}
    if torch.cuda.is_available():
        tags["env.gpu"] = torch.cuda.get_device_name(0)
    return tags


def record_tags() -> dict[str, str]:
    """Tags every run gets, children and `python -m pipeline` runs included."""
    return {**git_tags(), "code_version": code_version(), **environment_tags()}


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def runtime_params(device: torch.device, precision: str, cfg: Config) -> dict[str, str]:
    """What `device=auto` and `precision=auto` resolved to, and the threads torch used."""
    return {"device_resolved": str(device), "precision_resolved": precision,
            "data_pipeline": cfg.data_pipeline, "torch_threads": str(torch.get_num_threads())}


# MLflow caps a dataset digest at 36 characters: the digest column holds SHA-256's first 32 hex
# digits (128 bits), and the run's tag dataset.<context>.sha256 the whole of it.
DIGEST_CHARS = 32


def log_datasets(run_id: str, dataset) -> None:
    """Each split as an MLflow dataset input: context, source file, counts, and a SHA-256 digest
    of exactly the rows used (MLflow's own digest would hash only the first 10,000 elements)."""
    import warnings

    from mlflow.data import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    inputs, tags = [], {"data_digest": dataset.digest}
    for split in dataset.splits():
        context = {"val": "validation"}.get(split.role, split.role)
        with warnings.catch_warnings():  # "" and file:// both map to the local source: no matter
            warnings.simplefilter("ignore", UserWarning)
            ds = from_numpy(split.images.numpy(), source=str(split.source), targets=split.labels.numpy(),
                            name=f"{dataset.folder.name}/{split.source.name}:{split.role}",
                            digest=split.digest[:DIGEST_CHARS])
        inputs.append(DatasetInput(ds._to_mlflow_entity(),
                                   tags=[InputTag("mlflow.data.context", context)]))
        tags[f"dataset.{context}.sha256"] = split.digest
        tags[f"dataset.{context}.count"] = str(len(split.labels))
    client().log_inputs(run_id, datasets=inputs)
    set_tags(run_id, tags)


# -- params and metrics ------------------------------------------------------------------------

def log_config(run_id: str, cfg: Config, extra: dict[str, str] | None = None) -> None:
    """Log the fully resolved config as params and config.yaml.

    `mlflow run` has already logged the -P values as the user spelled them (1e-4); logging the
    same key again as 0.0001 would raise "Changing param values is not allowed", so keys the run
    already has are left as they are. config.yaml holds the canonical values.
    """
    existing = client().get_run(run_id).data.params
    values = {**cfg.to_params(), **(extra or {})}
    params = [Param(k, v) for k, v in values.items() if k not in existing]
    for start in range(0, len(params), 100):
        client().log_batch(run_id, params=params[start:start + 100])
    client().log_text(run_id, yaml.safe_dump(cfg.to_params(), sort_keys=False), "config.yaml")



def log_epoch(run_id: str, step: int, metrics: dict[str, float]) -> None:
    """One batched call per epoch, so logging costs one round trip."""
    ts = mlflow.utils.time.get_current_time_millis()
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def logged_steps(run_id: str, key: str) -> set[int]:
    return {m.step for m in client().get_metric_history(run_id, key)}


# -- checkpoints -------------------------------------------------------------------------------

def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file, fsync, rename: a kill never leaves a half-written .pt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@functools.lru_cache(maxsize=None)  # a run's artifact location never changes
def local_artifact_dir(run_id: str) -> Path | None:
    uri = client().get_run(run_id).info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    return None


def save_checkpoint(run_id: str, artifact_path: str, obj) -> None:
    """Write a checkpoint artifact atomically: straight into a local artifact store, or through
    a local atomic file uploaded whole to a remote one."""
    local = local_artifact_dir(run_id)
    with interrupts.critical():
        if local is not None:
            atomic_save(obj, local / artifact_path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_path).name
            atomic_save(obj, path)
            client().log_artifact(run_id, str(path), str(Path(artifact_path).parent))


def load_artifact(run_id: str, artifact_path: str, map_location="cpu", weights_only=True):
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=tmp)
        return torch.load(local, map_location=map_location, weights_only=weights_only)


def has_artifact(run_id: str, artifact_path: str) -> bool:
    folder, _, name = artifact_path.rpartition("/")
    return any(f.path == artifact_path for f in client().list_artifacts(run_id, folder or None))


# -- lineage -----------------------------------------------------------------------------------

def get_run(run_id: str, role: str = "parent"):
    try:
        return client().get_run(run_id)
    except MlflowException:
        raise LineageError(f"{role} run '{run_id}' was not found in the tracking store "
                           f"{mlflow.get_tracking_uri()}: pass the id of an existing run "
                           f"(see the MLflow UI or `mlflow runs list`)") from None


def check_parent(run_id: str):
    """The parent run, once it is known to exist, be FINISHED and hold checkpoints/best.pt."""
    run = get_run(run_id)
    if run.info.status != "FINISHED":
        raise LineageError(f"parent run {run_id} is {run.info.status}, not FINISHED: wait for it, "
                           f"resume it with -P resume_run_id={run_id}, or pass a finished run")
    if not has_artifact(run_id, BEST):
        raise LineageError(f"parent run {run_id} has no {BEST}: pass the id of a training "
                           f"stage's run (train, baseline, tune_lr, ...)")
    return run


def parent_state(run_id: str) -> dict:
    try:
        state = load_artifact(run_id, BEST)
    except Exception as err:  # truncated, not a zip, not torch's format, or a pickle with code in it
        raise LineageError(f"parent run {run_id}: {BEST} does not load as a checkpoint "
                           f"({type(err).__name__}); pass another parent run, or retrain this one") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LineageError(f"parent run {run_id}: {BEST} is not a state_dict of tensors; "
                           f"pass another parent run, or retrain this one")
    return state


# -- reuse -------------------------------------------------------------------------------------

def find_finished_run(experiment_id: str, training_key: str):
    """A FINISHED run whose params, parent and code version hash to `training_key`."""
    runs = client().search_runs(
        [experiment_id],
        filter_string=f"tags.training_key = '{training_key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def end_run(run_id: str, status: str) -> None:
    client().set_terminated(run_id, status=status)

