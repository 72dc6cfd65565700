"""SIGINT/SIGTERM become KeyboardInterrupt, except inside a checkpoint write, which finishes first.

Only the first signal interrupts: `mlflow run` follows a Ctrl-C with SIGTERM, and a second
KeyboardInterrupt raised inside the cleanup (marking runs KILLED, waiting for the last record)
would leave a run RUNNING. Later signals are noted and ignored; the process is ending anyway.
"""
from __future__ import annotations

import contextlib
import signal

_depth = 0
_pending: int | None = None
_stopping = False  # the first signal has been raised: the cleanup runs, undisturbed


def _handler(signum, frame):
    global _pending, _stopping
    if _stopping:
        return  # deferred until the cleanup is done, which ends the process
    if _depth:
        _pending = signum  # raised when the write in flight has finished
        return
    _stopping = True
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def critical():
    """A section that a signal must not cut in half."""
    global _depth, _pending, _stopping
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signum, _pending = _pending, None
            if not _stopping:
                _stopping = True
                raise KeyboardInterrupt(signal.Signals(signum).name)


def killed_runs(stopped: BaseException) -> list[str]:
    """The runs a SIGINT/SIGTERM ended KILLED on its way up, innermost first: carried by the
    KeyboardInterrupt itself (each handler that ends a run adds it), so the CLI can name the run
    that continues, and no module keeps a list of them."""
    if not hasattr(stopped, "killed_runs"):
        stopped.killed_runs = []
    return stopped.killed_runs
