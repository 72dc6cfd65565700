"""MLflow calls for training runs: params, metrics, checkpoints, lineage lookups and reuse."""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
import platform
import re
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import mlflow
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import interrupts
from .config import PROJECT_DIR, Config, code_version
from .models import CheckpointError

BEST = "checkpoints/best.pt"
LAST = "checkpoints/last.pt"
FINAL = "checkpoints/final.pt"     # the weights after the last epoch, where a next phase needs them


# On stage runs and their children: the data digest their weights descend from, or "mixed" when
# they grew out of a parent's weights trained on other data (stages.Lineage.data_of).
LINEAGE_DIGEST = "lineage_digest"


def descends_from(tags: dict[str, str]) -> str:
    """The data a run's weights descend from, by its tags: its lineage_digest; for a run without
    one (made before it existed), its data digest only if it trained from scratch, else ""."""
    if LINEAGE_DIGEST in tags:
        return tags[LINEAGE_DIGEST]
    scratch = tags.get("init_from", tags.get("source_run_id", "")) == "scratch"
    return tags.get("data_digest", "") if scratch else ""


class LineageError(RuntimeError):
    """A parent or resume run that cannot be used: the message is the one line the user sees."""


def client() -> MlflowClient:
    return MlflowClient()


def new_local_store(folder: Path) -> str:
    """A SQLite tracking store in `folder` (tests, benchmarks), created from there: MLflow puts
    its experiments' artifacts in ./mlruns of the process that creates the database."""
    uri = f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"
    with contextlib.chdir(folder):
        MlflowClient(uri).search_experiments()
    return uri


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
    """What `device=auto`, `precision=auto` and `eval_bs=0` resolved to, and the threads torch used."""
    return {"device_resolved": str(device), "precision_resolved": precision,
            "data_pipeline": cfg.data_pipeline, "torch_threads": str(torch.get_num_threads()),
            "eval_bs_resolved": str(cfg.eval_batch_size(device.type))}


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
# -- refusals from an authenticating server -------------------------------------------------------

AUTH_CODES = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}


def server_refusal(err: BaseException) -> str | None:
    """One line for a 401/403 from the tracking server (who was refused, for what, what to set),
    or None when `err` is something else. Covers MLflow's REST errors and its artifact uploads."""
    import requests

    if isinstance(err, MlflowException) and err.error_code in AUTH_CODES:
        status = AUTH_CODES[err.error_code]
        found = re.search(r"endpoint (\S+) failed", err.message)
        endpoint = found.group(1) if found else "a request"
    elif isinstance(err, requests.HTTPError) and getattr(err.response, "status_code", None) in (401, 403):
        status = err.response.status_code
        request = err.response.request
        endpoint = f"{request.method} {urlparse(request.url).path}" if request is not None else "a request"
    else:
        return None
    from mlflow.utils.credentials import read_mlflow_creds

    username = read_mlflow_creds().username
    who = f"user '{username}'" if username else ("the MLFLOW_TRACKING_TOKEN holder" if
                                                  os.environ.get("MLFLOW_TRACKING_TOKEN") else
                                                  "a request with no credentials")
    experiment = os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    what = endpoint + (f" (experiment {experiment})" if experiment else "")
    server = mlflow.get_tracking_uri()
    if status == 401 and not username:
        fix = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it "
               "(the server's admin creates accounts)")
    elif status == 401:
        fix = "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD: the server did not accept them"
    else:
        kind = "registered model" if "registered-model" in endpoint or "model-version" in endpoint \
            else "experiment"
        level = "READ" if re.search(r"/(get|search|list)", endpoint) else "EDIT"
        fix = (f"ask the {kind}'s owner (or an admin) for {level} permission for {who}, or set "
               f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user who has it")
    reason = "401 not authenticated" if status == 401 else "403 permission denied"
    return f"tracking server {server} refused {who} ({reason}) for {what}: {fix}"


def raise_if_refused(err: BaseException) -> None:
    """Let a server's 401/403 through a handler that would otherwise misreport it."""
    if server_refusal(err):
        raise err


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
    """write_checkpoint, which SIGINT/SIGTERM let finish before they stop the process."""
    with interrupts.critical():
        write_checkpoint(run_id, artifact_path, obj)


def write_checkpoint(run_id: str, artifact_path: str, obj) -> None:
    """Write a checkpoint artifact atomically: straight into a local artifact store, or through
    a local atomic file uploaded whole to a remote one. No signal handling of its own: the
    training thread calls save_checkpoint, a CheckpointWriter's thread this."""
    local = local_artifact_dir(run_id)
    if local is not None:
        atomic_save(obj, local / artifact_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_path).name
        atomic_save(obj, path)
        client().log_artifact(run_id, str(path), str(Path(artifact_path).parent))


def host_copy(state, device: torch.device):
    """`state` (dicts, lists and tuples of tensors and plain values, such as a state_dict or
    train.fit's snapshot) with every tensor copied to CPU memory of its own, so training can go
    on changing the originals while the copy is written. On CUDA the copies go to pinned memory,
    non-blocking, then one synchronize waits for all of them."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            if value.device.type == "cuda":
                return torch.empty_like(value, device="cpu", pin_memory=True).copy_(value, non_blocking=True)
            return value.detach().clone()
        if isinstance(value, dict):
            out = type(value)((k, copy(v)) for k, v in value.items())
            if hasattr(value, "_metadata"):  # a state_dict's module versions, read by load_state_dict
                out._metadata = value._metadata
            return out
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    out = copy(state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


class CheckpointWriter:
    """Runs jobs (an epoch's checkpoint writes and metrics) in a background thread, one at a time
    and in the order given, so the next epoch trains while the last one is written.

    submit() first waits for the job before it; wait() returns once the last job has finished
    and raises what it raised. The thread is not a daemon: a process that ends while it writes
    (Ctrl-C, an error) finishes the write first, and atomic_save's rename means a SIGKILL leaves
    the previous complete file.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], object]) -> None:
        self.wait()
        thread = threading.Thread(target=self._run, args=(job,), name="checkpoint-writer")
        thread.start()
        self._thread = thread

    def _run(self, job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = err

    def wait(self, raise_error: bool = True) -> BaseException | None:
        """Block until the job in flight is done; its error is raised (or, with raise_error=False,
        returned: for a caller already handling another)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None  # only once joined: an interrupted join is joined again
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error
        return error


def load_checkpoint(run_id: str, artifact_path: str, map_location="cpu"):
    """A checkpoint artifact as tensors and plain containers: torch.load(weights_only=True) runs
    no code from the file; anything else in it is refused with one line naming run and file."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=tmp)
        try:
            with warnings.catch_warnings():  # torch warns about odd pickles on stderr: we say it in one line
                warnings.simplefilter("ignore")
                return torch.load(local, map_location=map_location, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"run {run_id}: {artifact_path} {refusal_reason(err)}, so it was "
                                  f"refused unread: use another run, or train this one again") from None


def refusal_reason(err: Exception) -> str:
    """Why torch.load(weights_only=True) failed, in a few words (torch's own text is many lines
    and suggests weights_only=False, which would run the file's code)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found and found.group(1).startswith("pipeline."):
        return (f"is in an older format (it pickles {found.group(1)}), which this version "
                f"does not load")
    if found:
        return f"is not plain data: loading it would import and call {found.group(1)}"
    if isinstance(err, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        return f"is not plain data ({detail.group(1)[:120] if detail else 'refused by the weights-only loader'})"
    first = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0][:120] if text.strip() else ""
    return f"is not a readable checkpoint ({type(err).__name__}{': ' + first if first else ''})"


def load_weights(run_id: str, artifact_path: str = BEST) -> dict:
    """A model state_dict checkpoint (best.pt): names to tensors, nothing else."""
    state = load_checkpoint(run_id, artifact_path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"run {run_id}: {artifact_path} is not a model state_dict (a dict of "
                              f"tensors): use another run, or train this one again")
    return state


def delete_artifact(run_id: str, artifact_path: str) -> None:
    """Remove an artifact where the store allows it (local folders and `mlflow server`'s proxied
    store do); elsewhere it stays, harmless."""
    local = local_artifact_dir(run_id)
    if local is not None:
        (local / artifact_path).unlink(missing_ok=True)
        return
    from mlflow.artifacts import get_artifact_repository

    try:
        get_artifact_repository(client().get_run(run_id).info.artifact_uri).delete_artifacts(artifact_path)
    except Exception as err:  # noqa: BLE001 - an artifact store without deletion keeps the file
        raise_if_refused(err)


def has_artifact(run_id: str, artifact_path: str) -> bool:
    folder, _, name = artifact_path.rpartition("/")
    return any(f.path == artifact_path for f in client().list_artifacts(run_id, folder or None))


# -- lineage -----------------------------------------------------------------------------------

def get_run(run_id: str, role: str = "parent"):
    try:
        return client().get_run(run_id)
    except MlflowException as err:
        raise_if_refused(err)
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
    return load_weights(run_id, BEST)


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



# -- system/ metrics -----------------------------------------------------------------------------

# About 10 samples an epoch: a short epoch still shows whether the device was busy, and a long one
# (an hour on a CPU) does not log thousands of rows. Under 1 s sampling would cost more than it
# shows; over 30 s a stall of half a minute would vanish in the mean.
SAMPLES_PER_EPOCH = 10
INTERVAL_RANGE_S = (1.0, 30.0)
# A first guess of an epoch's length, before one is measured (docs/benchmarks.md: about 150-300
# img/s on this project's 2-core CPU, 25-40k on an H100), evaluation counted at a third the cost.
GUESSED_IMAGES_PER_S = {"cpu": 200.0, "cuda": 25_000.0}
STOP_WAIT_S = 5.0


def sampling_interval(epoch_s: float) -> float:
    low, high = INTERVAL_RANGE_S
    return min(max(epoch_s / SAMPLES_PER_EPOCH, low), high)


def guess_epoch_s(device_type: str, train_images: int, eval_images: int) -> float:
    return (train_images + eval_images / 3) / GUESSED_IMAGES_PER_S.get(device_type, 200.0)


class SystemMetrics:
    """MLflow's system/ metrics for one run (CPU, memory, disk, network; GPU utilisation and
    memory where pynvml finds an NVIDIA GPU), sampled in a daemon thread.

    Training runs are made with MlflowClient, never fluent start_run(log_system_metrics=True),
    so the monitor is started here for the run id given (it never reads MLFLOW_RUN_ID). The
    interval follows the epoch (sampling_interval) unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    fixes it; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off. Whatever goes wrong in it
    is a warning: it never fails or holds up a run.
    """

    def __init__(self, run_id: str, first_epoch_s: float):
        from mlflow.environment_variables import (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING,
                                                  MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)

        self.monitor = None
        self.fixed_interval = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() is not None
        if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set() and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
            return
        try:
            import psutil
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            psutil.cpu_percent()  # the first call reads 0.0: start the count now, not at sample 1
            # resume_logging: a resumed run's samples continue after its earlier ones
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval(first_epoch_s),
                                                resume_logging=True, tracking_uri=mlflow.get_tracking_uri())
            self.monitor.start()
        except Exception as err:  # noqa: BLE001 - metrics about the run must never stop it
            warnings.warn(f"system metrics are off for run {run_id}: {type(err).__name__}: {err}")
            self.monitor = None

    def epoch_took(self, seconds: float) -> None:
        if self.monitor is not None and not self.fixed_interval:
            self.monitor.sampling_interval = sampling_interval(seconds)  # read at every wait

    def stop(self) -> None:
        """Stop sampling and log what the last interval collected (so a run shorter than one
        interval still gets a sample), waiting at most STOP_WAIT_S for the thread."""
        monitor, self.monitor = self.monitor, None
        thread = getattr(monitor, "_process", None)
        if thread is None:
            return
        try:
            monitor._shutdown_event.set()  # finish() would join without a timeout
            thread.join(STOP_WAIT_S)
            if thread.is_alive():  # stuck in a call to the tracking server: leave the daemon
                warnings.warn(f"system metrics thread still busy after {STOP_WAIT_S:g} s; not waiting")
                return
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"system metrics: the last sample was not logged: {type(err).__name__}: {err}")
