"""SIGINT/SIGTERM become KeyboardInterrupt, except inside a checkpoint write, which finishes first."""
from __future__ import annotations

import contextlib
import signal

_depth = 0
_pending: int | None = None


def _handler(signum, frame):
    global _pending
    if _depth:
        _pending = signum  # raised when the write in flight has finished
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def critical():
    """A section that a signal must not cut in half."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signum, _pending = _pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)
