"""What a user can fix: each error's message is the one line they see (`python -m pipeline`
prints it and exits with `exit_code`). Every refusal in the pipeline is one of these."""
from __future__ import annotations

from .urls import scrubbed


def first_line(err: BaseException, limit: int | None = 160, empty: str = "") -> str:
    """An error's message cut to its first line (and `limit` characters) for a one-line report,
    any password in a URL in it shown as ***; `empty` when the message is blank."""
    lines = str(err).strip().splitlines()
    return scrubbed(lines[0])[:limit] if lines else empty


class UserError(Exception):
    """A refusal the user can act on; never a bug."""
    exit_code = 2


class ConfigError(UserError, ValueError):
    """A bad parameter value."""


class DataError(UserError, RuntimeError):
    """Bad or missing data."""


class LineageError(UserError, RuntimeError):
    """A parent or resume run that cannot be used."""


class TakenOver(LineageError):
    """Another process claimed the run this one trains (its heartbeat looked stale from there, or
    -P force=true): this one stops and leaves that run's status to that writer (the runs above it
    are this process's and end FAILED as for any error)."""

    def __init__(self, message: str, run_id: str = ""):  # a default: unpickled (from Ray) with the message alone
        super().__init__(message)
        self.run_id = run_id


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; `reason`: what is wrong with it, without the advice."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class PredictError(UserError, RuntimeError):
    """A model or input that cannot be used."""


class ModelRefused(UserError, RuntimeError):
    """A logged or registered model that is not loaded (not pt2, or not readable)."""


class NotLikeTheDriver(UserError, RuntimeError):
    """A Ray worker whose code or runtime differs from the driver's: it refuses to train."""


class ChildFailed(UserError, RuntimeError):
    """A child that failed for good on Ray: its run is FAILED; the same command resumes the rest."""
    exit_code = 1
