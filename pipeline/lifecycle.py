"""The run lifecycle: who is writing a run (heartbeat, claims), which earlier runs a new one
continues, and rebuilding a finished child's result from what MLflow recorded.

A run is written by one process at a time. Each training run, and the stage run above it, carry
tag `heartbeat` = the writer's identity and the time, refreshed every epoch: host, boot id, pid
namespace, pid and the process's start time (so a recycled pid, or a container that shares the
hostname, is never mistaken for the writer), and the Ray task that trains it (executor=ray), whose
retries may take it over at once. A run is live when it is RUNNING and its writer still runs: on
this kernel and pid namespace, that exact process exists (so a run killed with SIGKILL, which
MLflow still shows RUNNING, is not live); elsewhere, its heartbeat is younger than STALE_AFTER_S.
A live run is never resumed or adopted by another process, unless force=true.

Taking a run over (resume, adoption) is a claim: param `writer.<n>` holding the new writer's
identity, n one more than the claims it has. A param is write-once in MLflow's SQL stores and
through `mlflow server` (the database refuses a second value for the same key), so of two
processes that claim one run at the same moment exactly one succeeds; the other stops with one
line.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Collection

from mlflow.exceptions import MlflowException

from . import pause, tracking, train
from .config import Config
from .errors import LineageError, TakenOver
from .files import alive, boot_id, pid_namespace, proc_text
from .keys import code_version
from .runtime import Runtime

HEARTBEAT = "heartbeat"
CLAIM = "writer."                   # params writer.1, writer.2, ...: one per takeover
STAGE_KEY = "stage_key"             # set when a stage run starts: finds it again if it never finishes
CONTINUED_IN = "continued_in"       # on an unfinished stage run whose children a later run took over
STALE_AFTER_S = 900                 # a heartbeat from another host older than this: its writer is gone



def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc does not say)."""
    stat = proc_text(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


_identity: dict[int, dict[str, str]] = {}


def identity() -> dict[str, str]:
    """This process as a writer: host, boot id, pid namespace, pid and start time."""
    pid = os.getpid()
    if pid not in _identity:  # per pid: a forked child is another writer
        _identity[pid] = {"host": socket.gethostname(), "boot": boot_id(),
                          "pidns": pid_namespace(), "pid": str(pid), "start": process_start(pid)}
    return _identity[pid]


def stamp(task: str = "", **other: str) -> str:
    """This writer's identity and the time; `task`: the Ray task it trains for ("" outside Ray).
    Ray retries a task under the same id only once its worker is gone, so a run whose heartbeat
    names the task a process trains for has no other writer. `other`: fields that differ (a
    stamp of another process, as the tests write one)."""
    # to the millisecond: a claim is compared with the run's end_time (live_writer)
    fields = {**identity(), "time": f"{time.time():.3f}", **other}
    if task:
        fields["task"] = task
    return " ".join(f"{k}={v}" for k, v in fields.items())


def parse_stamp(text: str) -> dict[str, str] | None:
    """A stamp's fields; the older "<host> <pid> <time> [<task>]" form too; None if unreadable."""
    parts = text.split()
    try:
        if parts and all("=" in p for p in parts):
            fields = dict(p.split("=", 1) for p in parts)
        else:
            host, pid, when, *task = parts
            fields = {"host": host, "pid": pid, "time": when, **({"task": task[0]} if task else {})}
        int(fields["pid"]), float(fields["time"])
        return fields
    except (ValueError, KeyError):
        return None


def beat(*run_ids: str, task: str = "") -> None:
    text = stamp(task)
    for run_id in run_ids:
        tracking.client().set_tag(run_id, HEARTBEAT, text)


BEAT_EVERY_S = 60


@contextlib.contextmanager
def heartbeat(*run_ids: str, task: str = ""):
    """Refresh the runs' heartbeats every BEAT_EVERY_S from a background thread while the block
    runs, so an epoch longer than STALE_AFTER_S never looks like a dead writer from elsewhere."""
    stop = threading.Event()

    def loop():
        while not stop.wait(BEAT_EVERY_S):
            for run_id in run_ids:  # one by one: a run the store cannot read never costs the others their beat
                try:  # not over the beats of a process that has taken a run over (check_still_writer)
                    if taken_over(tracking.client().get_run(run_id)) is None:
                        beat(run_id, task=task)
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


def claims(run) -> dict[int, str]:
    return {int(k[len(CLAIM):]): v for k, v in run.data.params.items()
            if k.startswith(CLAIM) and k[len(CLAIM):].isdigit()}


def latest_claim(run) -> dict[str, str] | None:
    made = claims(run)
    return parse_stamp(made[max(made)]) if made else None


def claimed_since_it_ended(run) -> dict[str, str] | None:
    """The latest claim of a run that is not RUNNING, if made after the run last ended: its
    claimant has taken it over."""
    claim = latest_claim(run)
    if run.info.status == "RUNNING" or claim is None or float(claim["time"]) <= (run.info.end_time or 0) / 1000:
        return None
    return claim


def writer_alive(fields: dict[str, str]) -> bool:
    me = identity()
    pid = int(fields["pid"])
    if not fields.get("boot") or not me["boot"]:  # the older stamp, or no /proc here: host and pid
        return _pid_runs_pipeline(pid) if fields["host"] == me["host"] else \
            time.time() - float(fields["time"]) < STALE_AFTER_S
    if fields["boot"] == me["boot"] and fields.get("pidns") == me["pidns"]:
        start = process_start(pid)
        if start:
            return start == fields.get("start")
        if not alive(pid):  # no start time: gone, or hidden from this user (/proc mounted hidepid)
            return False
        return time.time() - float(fields["time"]) < STALE_AFTER_S
    return time.time() - float(fields["time"]) < STALE_AFTER_S  # another machine or container


def is_mine(fields: dict[str, str]) -> bool:
    """Whether a stamp (heartbeat or claim) is this process's."""
    me = identity()
    return all(fields.get(k) == me[k] for k in ("host", "boot", "pidns", "pid", "start") if k in fields)


def live_writer(run, tasks: Collection[str] = ()) -> str | None:
    """Who is writing `run` now ("host pid N, heartbeat 12 s ago"), or None when nobody is, or
    when it is this process or one of its Ray `tasks` (lifecycle.stamp's `task`): the newest of
    its heartbeat and its latest claim. A run that is not RUNNING has a writer only if
    it was claimed after it last ended (a resumer that has not marked it RUNNING yet, or a command
    that continues its children in a run of its own, which beats it while it runs)."""
    heartbeat = parse_stamp(run.data.tags.get(HEARTBEAT, ""))
    if run.info.status == "RUNNING":
        stamps = [heartbeat, latest_claim(run)]
    else:  # and its claimant's own heartbeats since (a command continuing it beats it as it goes)
        claim = claimed_since_it_ended(run)
        same_writer = claim is not None and heartbeat is not None and \
            all(heartbeat.get(k) == claim.get(k) for k in ("host", "boot", "pidns", "pid", "start"))
        stamps = [claim, heartbeat if same_writer else None]
    stamps = [s for s in stamps if s is not None]
    if not stamps:
        return None  # never trained an epoch: no writer to protect
    fields = max(stamps, key=lambda f: float(f["time"]))
    if is_mine(fields):
        return None
    if fields.get("task") and fields["task"] in tasks:  # an earlier attempt of this Ray task, or a driver's own
        return None
    if not writer_alive(fields):
        return None
    return f"{fields['host']} pid {fields['pid']}, heartbeat {time.time() - float(fields['time']):.0f} s ago"


def refuse_if_live(run, cfg: Config, action: str, task: str = "") -> None:
    writer = live_writer(run, (task,))
    if writer and not cfg.force:
        raise LineageError(
            f"run {run.info.run_id} is live ({writer}): another process is writing it, so it was not "
            f"{action}; wait for it or stop it, or add -P force=true if that process is gone")


def claim(run, cfg: Config, action: str, task: str = "") -> None:
    """Become `run`'s one writer: refused if it is live (unless force=true), then claimed with
    param writer.<n+1>. Of processes claiming it at once, one succeeds; the others get one line."""
    refuse_if_live(run, cfg, action, task)
    pause.point("takeover", cfg.stage, run.info.run_id)
    number = max(claims(run), default=0) + 1
    run_id = run.info.run_id
    try:
        tracking.client().log_param(run_id, f"{CLAIM}{number}", stamp(task))
    except MlflowException as err:
        tracking.raise_if_refused(err)
        if "Changing param values is not allowed" not in str(err):
            raise
        other = parse_stamp(claims(tracking.client().get_run(run_id)).get(number, "")) or {}
        raise LineageError(
            f"run {run_id} was taken over by another process ({other.get('host', '?')} pid "
            f"{other.get('pid', '?')}) at the same moment, so it was not {action} here: that process "
            f"trains it; wait for it to finish") from None
    beat(run_id, task=task)
    pause.point("claimed", cfg.stage, run_id)


def taken_over(run, tasks: Collection[str] = ()) -> dict[str, str] | None:
    """The claim by which another process took `run` over from this one and its Ray `tasks` (its
    latest claim, when not theirs), or None."""
    claim = latest_claim(run)
    return claim if claim is not None and not is_mine(claim) and claim.get("task") not in tasks else None


def check_still_writer(run_id: str) -> None:
    """TakenOver once another process has claimed `run_id`: asked before each epoch's record,
    so two writers never both train one run. A run this process claimed, which the writer it
    took over from ended as it stopped (FAILED by `mlflow run` or a Ray driver), reads RUNNING
    again: it is being written."""
    run = tracking.client().get_run(run_id)
    claim = latest_claim(run)
    if claim is not None and not is_mine(claim):
        raise TakenOver(f"run {run_id} was taken over by {claim.get('host', '?')} pid {claim.get('pid', '?')} "
                        f"(this process's heartbeat looked stale there, or it was given -P force=true): this "
                        f"process stopped training it and left the run to that writer", run_id)
    if claim is not None and run.info.status != "RUNNING":
        tracking.client().update_run(run_id, status="RUNNING")


def check_same_record(run, data_digest: str, runtime: Runtime) -> None:
    """A run continues only with what it started with: the same data (digest), code
    (code_version), device type and precision, read from its own record. Anything else would
    make one run of two experiments; force=true does not change that."""
    tags, params = run.data.tags, run.data.params
    recorded = {"data digest": tags.get("data_digest", ""), "code_version": tags.get("code_version", ""),
                "device type": params.get("device_resolved", "").split(":")[0],
                "precision": params.get("precision_resolved", "")}
    now = {"data digest": data_digest, "code_version": code_version(), "device type": runtime.device_type,
           "precision": runtime.precision}
    differ = [f"{what} {recorded[what][:16] or 'unrecorded'} then, {now[what][:16]} now" for what in now
              if recorded[what] != now[what]]
    if differ:
        raise LineageError(
            f"run {run.info.run_id} cannot be continued here: {'; '.join(differ)}; a run is never continued "
            f"with other data, code or runtime: restore them, or start a new run (without resume_run_id)")


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
                         diverged=tags.get("diverged") == "true",
                         total_time_s=metrics.get("total_time_s", 0.0))
