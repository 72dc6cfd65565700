"""The run lifecycle: who is writing a run (heartbeat), which earlier runs a new one continues,
and rebuilding a finished child's result from what MLflow recorded.

A run is written by one process at a time. Each training run, and the stage run above it, carry
tag `heartbeat` = "<host> <pid> <unix time> [<owner>]", refreshed every epoch; owner is the Ray
task that trains it (executor=ray), whose retries may take it over at once. A run is live when it is
RUNNING and its writer still runs: on this host, its pid is alive (so a run killed with SIGKILL,
which MLflow still shows RUNNING, is not); on another host, its heartbeat is younger than
STALE_AFTER_S. A live run is never resumed or adopted by another process, unless force=true.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

from . import tracking, train
from .config import Config

HEARTBEAT = "heartbeat"
STAGE_KEY = "stage_key"             # set when a stage run starts: finds it again if it never finishes
CONTINUED_IN = "continued_in"       # on an unfinished stage run whose children a later run took over
STALE_AFTER_S = 900                 # a heartbeat from another host older than this: its writer is gone

# Earlier, unfinished runs of the stage being run, whose children it may take over (set by stages).
ADOPTABLE: set[str] = set()
# The Ray task this process trains for ("" outside Ray). Ray retries a task under the same id only
# once its worker is gone, so a run whose heartbeat names this task has no other writer.
OWNER = {"task": ""}


def beat(*run_ids: str) -> None:
    stamp = f"{socket.gethostname()} {os.getpid()} {time.time():.0f} {OWNER['task']}".rstrip()
    for run_id in run_ids:
        tracking.client().set_tag(run_id, HEARTBEAT, stamp)


BEAT_EVERY_S = 60


@contextlib.contextmanager
def heartbeat(*run_ids: str):
    """Refresh the runs' heartbeats every BEAT_EVERY_S from a background thread while the block
    runs, so an epoch longer than STALE_AFTER_S never looks like a dead writer from elsewhere."""
    stop = threading.Event()

    def loop():
        while not stop.wait(BEAT_EVERY_S):
            try:
                beat(*run_ids)
            except Exception:  # noqa: BLE001 - a missed beat is retried; training goes on
                pass

    thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _pid_runs_pipeline(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a recycled pid that is not ours is not our writer (a Ray worker's reads ray::...)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"pipeline" in cmdline or cmdline.startswith(b"ray::")
    except OSError:
        return True


def live_writer(run) -> str | None:
    """Who is writing `run` now ("host pid N, heartbeat 12 s ago"), or None when nobody is."""
    if run.info.status != "RUNNING":
        return None
    stamp = run.data.tags.get(HEARTBEAT, "")
    try:
        host, pid, when, *owner = stamp.split()
        pid, age = int(pid), time.time() - float(when)
    except ValueError:
        return None  # never trained an epoch: no writer to protect
    if pid == os.getpid() and host == socket.gethostname():
        return None
    if owner and owner[0] == OWNER["task"]:  # an earlier attempt of this Ray task: its worker died
        return None
    alive = _pid_runs_pipeline(pid) if host == socket.gethostname() else age < STALE_AFTER_S
    return f"{host} pid {pid}, heartbeat {age:.0f} s ago" if alive else None


def refuse_if_live(run, cfg: Config, action: str) -> None:
    writer = live_writer(run)
    if writer and not cfg.force:
        raise tracking.LineageError(
            f"run {run.info.run_id} is live ({writer}): another process is writing it, so it was not "
            f"{action}; wait for it or stop it, or add -P force=true if that process is gone")


# -- keys -----------------------------------------------------------------------------------------

def child_key(cfg: Config, data_digest: str, name: str, init_source: str) -> str:
    """A child's training_key: its own config, its data, its place in the stage (name), and the
    run its weights come from (phase 2 depends on phase 1's run)."""
    text = f"{cfg.study_key(data_digest)}|{name}|{init_source}"  # n_trials changes no trial
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- continuing a stage ---------------------------------------------------------------------------

def earlier_stage_runs(experiment_id: str, stage_key: str, current: str, finished: bool = False) -> list:
    """Earlier top-level runs of the same stage, parameters, parent and data that did not finish
    (and, with `finished`, those that did), not yet continued by another run."""
    runs = tracking.client().search_runs(
        [experiment_id], filter_string=f"tags.{STAGE_KEY} = '{stage_key}'",
        order_by=["attributes.start_time DESC"], max_results=100)
    return [r for r in runs if r.info.run_id != current and (finished or r.info.status != "FINISHED")
            and CONTINUED_IN not in r.data.tags and "mlflow.parentRunId" not in r.data.tags]


def find_child(experiment_id: str, key: str, parents: set[str]):
    """The newest child with this key under one of `parents`, or None."""
    runs = tracking.client().search_runs(
        [experiment_id], filter_string=f"tags.training_key = '{key}'",
        order_by=["attributes.start_time DESC"], max_results=50)
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") in parents:
            return run
    return None


def history_from_record(run_id: str) -> train.History:
    """A finished run's History, rebuilt from its logged metrics (no checkpoint needed)."""
    client = tracking.client()
    columns = {}
    for name in [f.name for f in train.EpochResult.__dataclass_fields__.values() if f.name != "epoch"]:
        columns[name] = {m.step: m.value for m in client.get_metric_history(run_id, name)}
    steps = sorted(columns["test_acc"])
    epochs = [train.EpochResult(step, **{k: v.get(step) for k, v in columns.items()}) for step in steps]
    run = client.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    selected_on = tags.get("selected_on", "test")
    return train.History(epochs=epochs, selected_on=selected_on,
                         best_acc=metrics[f"best_{selected_on}_acc"], best_epoch=int(metrics["best_epoch"]),
                         test_acc_at_best=metrics["test_acc_at_best"],
                         stopped_early=tags.get("stopped_early") == "true",
                         total_time_s=metrics.get("total_time_s", 0.0))
