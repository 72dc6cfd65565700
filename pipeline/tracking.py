"""MLflow calls for training runs: the record every run carries (tags, datasets), params and
metrics, artifacts, run lookups and reuse, and one line for a 401/403 from a tracking server."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from .config import PROJECT_DIR, Config
from .errors import LineageError
from .keys import code_version
from .urls import redacted

# On stage runs and their children: the data digest their weights descend from, or "mixed" when
# they grew out of a parent's weights trained on other data (lineage.Lineage.data_of).
LINEAGE_DIGEST = "lineage_digest"


def descends_from(tags: dict[str, str]) -> str:
    """The data a run's weights descend from, by its tags: its lineage_digest; for a run without
    one (made before it existed), its data digest only if it trained from scratch, else ""."""
    if LINEAGE_DIGEST in tags:
        return tags[LINEAGE_DIGEST]
    scratch = tags.get("init_from", tags.get("source_run_id", "")) == "scratch"
    return tags.get("data_digest", "") if scratch else ""


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


# MLflow caps a dataset digest at 36 characters: the digest column holds SHA-256's first 32 hex
# digits (128 bits), and the run's tag dataset.<context>.sha256 the whole of it.
DIGEST_CHARS = 32


def log_datasets(run_id: str, dataset, roles: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Each split (of `roles`) as an MLflow dataset input: context, source file, counts, and a
    SHA-256 digest of exactly the rows used (MLflow's own digest would hash only the first 10,000
    elements)."""
    import warnings

    from mlflow.data import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    inputs, tags = [], {"data_digest": dataset.digest}
    for split in (split for split in dataset.splits() if split.role in roles):
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
    log_inputs(run_id, inputs)
    set_tags(run_id, tags)


def lost_dataset_race(err: MlflowException) -> bool:
    """SQLAlchemy's IntegrityError (its error code gkpj) on MLflow's INSERT INTO datasets: worded
    alike by every database MLflow supports, in any language, directly or through a server."""
    text = str(err)
    return "INSERT INTO datasets" in text and "sqlalche.me/e/" in text and "/gkpj" in text


def log_inputs(run_id: str, inputs: list, attempts: int = 3) -> None:
    """MLflow adds a dataset new to the experiment by looking first, then inserting: two runs that
    log the same new dataset at one moment (two `train`s started together, parallel trials) can
    both insert, and the later fails on the datasets table's key. The dataset is there by then, so
    the next try links the run to it. Up to `attempts` tries; any other error is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            client().log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            if attempt == attempts or not lost_dataset_race(err):
                raise


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
    return f"tracking server {redacted(server)} refused {who} ({reason}) for {what}: {fix}"


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


# -- artifacts ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)  # a run's artifact location never changes
def local_artifact_dir(run_id: str) -> Path | None:
    uri = client().get_run(run_id).info.artifact_uri
    if urlparse(uri).scheme in ("", "file"):  # decoded as MLflow's own local store reads it (%20 is a space)
        return Path(local_file_uri_to_path(uri))
    return None


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
        # no such run, or an id MLflow's client finds malformed (a pasted runs:/ URI); anything else is
        # a store that is down or broken: its own error, not "no such run"
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise LineageError(f"{role} run '{run_id}' was not found in the tracking store "
                           f"{redacted(mlflow.get_tracking_uri())}: pass the id of an existing run "
                           f"(see the MLflow UI or `mlflow runs list`)") from None


def stored_run(run_id: str):
    """The run, or None when the store no longer has it (deleted for good: `mlflow gc`)."""
    try:
        return client().get_run(run_id)
    except MlflowException as err:
        raise_if_refused(err)
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


GONE = "is gone from the store (deleted for good): passed over"


# -- reuse -------------------------------------------------------------------------------------

def find_finished_run(experiment_id: str, training_key: str):
    """A FINISHED run whose params, parent and code version hash to `training_key`."""
    runs = client().search_runs(
        [experiment_id],
        filter_string=f"tags.training_key = '{training_key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def supersede(run_id: str, key: str) -> None:
    """Take a run out of reuse for good: main and child_run find runs by their training_key tag."""
    client().set_tag(run_id, "training_key", f"superseded-{key}")


def supersede_finished(run_id: str) -> None:
    """Take `run_id` out of reuse if it FINISHED with a key (once: a key superseded stays as it is)."""
    run = client().get_run(run_id)
    key = run.data.tags.get("training_key", "")
    if run.info.status == "FINISHED" and key and not key.startswith("superseded-"):
        supersede(run_id, key)


def end_run(run_id: str, status: str) -> None:
    client().set_terminated(run_id, status=status)
