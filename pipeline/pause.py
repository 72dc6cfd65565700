"""Test-only pause points: hold a process at a named place so a test never races training.

Off unless SVHN_PAUSE_AT is set (never in normal use). SVHN_PAUSE_AT="name[:n][@stage],..." holds
the process the n-th time (default: the first) it reaches point `name` (in a run of `stage`, when
given): it writes SVHN_PAUSE_DIR/<name>-<n>.paused (its pid and the run id) and waits, signals
still delivered, until SVHN_PAUSE_DIR/<name>-<n>.go exists or the process is killed. Each marker
holds one process once: another process that shares the folder (a Ray retry of a killed worker)
passes a point whose marker exists already.
Points: `epoch` (after an epoch's record is written), `batch` (before a training batch),
`takeover` (after the liveness check, before claiming a run), `claimed` (after claiming it),
`cleanup` (a signal caught, before the run is marked KILLED), `registered` (a stage's model registered and its alias judged, before its run finishes).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

# the variables that turn pause points on: the executor hands them to Ray workers with MLflow's
ENV = ("SVHN_PAUSE_AT", "SVHN_PAUSE_DIR")

_hits: dict[tuple[str, str], int] = {}


def wanted(name: str, stage: str = "") -> str:
    """The marker stem ("<name>-<n>") if this visit to point `name` is one to hold at, else ""."""
    spec = os.environ.get("SVHN_PAUSE_AT", "")
    if not spec:
        return ""
    count = _hits[name, stage] = _hits.get((name, stage), 0) + 1
    for item in spec.split(","):
        item, _, only_stage = item.strip().partition("@")
        point, _, nth = item.partition(":")
        if point == name and (not only_stage or only_stage == stage) and count == int(nth or 1):
            return f"{name}-{count}"
    return ""


def hold(stem: str, run_id: str = "") -> None:
    folder = Path(os.environ.get("SVHN_PAUSE_DIR", "."))
    go = folder / f"{stem}.go"
    draft = folder / f".{stem}.{os.getpid()}"
    draft.write_text(f"{os.getpid()} {run_id}\n")
    try:
        os.link(draft, folder / f"{stem}.paused")  # whole, and only if no process held here before
    except FileExistsError:
        return
    finally:
        draft.unlink()
    while not go.exists():
        time.sleep(0.05)


def point(name: str, stage: str = "", run_id: str = "", before=None) -> None:
    """Hold here if SVHN_PAUSE_AT asks to; `before()` runs first (e.g. finish writing a record)."""
    stem = wanted(name, stage)
    if stem:
        if before is not None:
            before()
        hold(stem, run_id)


class _PausingBatches:
    def __init__(self, batches, stage: str, run_id: str, before):
        self.batches, self.stage, self.run_id, self.before = batches, stage, run_id, before

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for item in self.batches:
            point("batch", self.stage, self.run_id, self.before)
            yield item


def batches(train_batches, stage: str, run_id: str, before=None):
    """`train_batches`, with the `batch` point before each batch when SVHN_PAUSE_AT names it."""
    if "batch" not in os.environ.get("SVHN_PAUSE_AT", ""):
        return train_batches
    return _PausingBatches(train_batches, stage, run_id, before)
