"""A run's checkpoints, with their rules in one place.

- best.pt: the weights of the best epoch on the selection split (a state_dict);
- last.pt: everything to resume (train.EpochEnd.snapshot), every `checkpoint_every` epochs and
  with every best, so the two never disagree about which epoch is behind them;
- final.pt: the weights after the last epoch, where a next phase starts from them.

Every file is written atomically (temp file, fsync, rename) and read with torch's weights-only
loader, so a kill never leaves half a file and a crafted file runs no code. An `EpochRecorder`
writes each epoch's record (last.pt, best.pt, then the metrics that last.pt covers) in a
background thread, in order, while the next epoch trains.
"""
from __future__ import annotations

import functools
import pickle
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import mlflow
import torch
from mlflow.exceptions import MlflowException

from . import interrupts, models, tracking
from .errors import CheckpointError, LineageError, first_line
from .files import TEMP_GLOB, atomic_write
from .rng import set_rng_state
from .train import CHECKPOINT_FORMAT, EpochEnd, History, Hyper, make_optimizer

BEST = "checkpoints/best.pt"
LAST = "checkpoints/last.pt"
FINAL = "checkpoints/final.pt"     # the weights after the last epoch, where a next phase needs them


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file, fsync, rename: a kill never leaves a half-written .pt."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)


def drop_stale_temps(run_id: str) -> None:
    """Remove the temp files of atomic_save that a killed writer (SIGKILL, the OOM killer) left in
    the run's local checkpoints folder; its resume writes under another pid. Only when no write of
    the run is in flight (it has finished)."""
    local = tracking.local_artifact_dir(run_id)
    if local is not None:
        for stale in (local / Path(BEST).parent).glob(TEMP_GLOB):
            stale.unlink(missing_ok=True)


def save_checkpoint(run_id: str, artifact_path: str, obj) -> None:
    """write_checkpoint, which SIGINT/SIGTERM let finish before they stop the process."""
    with interrupts.critical():
        write_checkpoint(run_id, artifact_path, obj)


def write_checkpoint(run_id: str, artifact_path: str, obj) -> None:
    """Write a checkpoint artifact atomically: straight into a local artifact store, or through
    a local atomic file uploaded whole to a remote one. No signal handling of its own: the
    training thread calls save_checkpoint, the EpochRecorder's writer thread this."""
    local = tracking.local_artifact_dir(run_id)
    if local is not None:
        save_here(obj, local / artifact_path, artifact_path, run_id)
        return
    with tempfile.TemporaryDirectory() as tmp:  # an upload's own errors are the store's: reported as such
        path = Path(tmp) / Path(artifact_path).name
        save_here(obj, path, artifact_path, run_id)
        tracking.client().log_artifact(run_id, str(path), str(Path(artifact_path).parent))


def save_here(obj, path: Path, artifact_path: str, run_id: str) -> None:
    """atomic_save on this machine's disk; a full disk or a folder made read-only is one line (the
    file there before stays whole)."""
    try:
        atomic_save(obj, path)
    except OSError as err:
        raise CheckpointError(f"cannot write {artifact_path} of run {run_id} to {path} "
                              f"({err.strerror or type(err).__name__}): free some space there or make it "
                              f"writable; the checkpoints written before are whole, so the run can "
                              f"continue from them") from None


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
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=tmp)
        except (MlflowException, OSError) as err:  # MLflow's text is a dict of every failed file
            tracking.raise_if_refused(err)
            try:
                gone = not tracking.has_artifact(run_id, artifact_path)
            except (MlflowException, OSError):
                gone = False
            reason = f"run {run_id}: " + (f"{artifact_path} is gone (deleted?)" if gone
                                           else f"{artifact_path} could not be read ({first_line(err, 120)})")
            raise CheckpointError(f"{reason}: use another run, or train this one again", reason) from None
        try:
            with warnings.catch_warnings():  # torch warns about odd pickles on stderr: we say it in one line
                warnings.simplefilter("ignore")
                return torch.load(local, map_location=map_location, weights_only=True)
        except Exception as err:
            reason = f"run {run_id}: {artifact_path} {refusal_reason(err)}, so it was refused unread"
            raise CheckpointError(f"{reason}: use another run, or train this one again", reason) from None


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


class EpochRecorder:
    """The callback that records each epoch of run `run_id` (train.Callback), in this order:
    last.pt, best.pt, then the metrics of the epochs that last.pt covers. A kill between the two
    files leaves a last.pt whose own epoch is the best and an older best.pt: catch_up writes
    best.pt again from it. (The other order could leave a best.pt from an epoch no last.pt
    covers, which the resume trains again, maybe to other weights than those kept.)

    An epoch's metrics are held back until a last.pt covers them, so a kill never leaves a
    logged epoch that a resume would train (and log) again. The record is handed to a
    background writer, one at a time and in order; `close()` writes a last.pt for the epochs
    still uncovered and waits for everything.
    """

    def __init__(self, run_id: str, device: torch.device, every: int, logged: set[int]):
        self.run_id, self.device, self.every = run_id, device, every
        self.logged = logged                # steps already logged (a resumed run's)
        self.writer = CheckpointWriter()
        self.uncovered: list[tuple[int, dict]] = []
        self.snapshot: Callable[[], dict] | None = None

    def __call__(self, end: EpochEnd) -> bool:
        self.writer.wait()  # the previous epoch's record first: one at a time, in order
        self.uncovered.append((end.result.epoch, end.result.metrics()))
        self.snapshot = end.snapshot
        if end.is_best or end.result.epoch % self.every == 0:
            self.submit(end.is_best)
        return False

    def catch_up(self, resume: dict) -> None:
        """A resumed run killed between writing last.pt and best.pt, or before logging what last.pt
        covers: write best.pt from last.pt when last.pt's epoch is the best, and log the rest, once."""
        history = History.from_state(resume["history"])
        if history.epochs and history.best_epoch == history.epochs[-1].epoch == resume["epoch"]:
            save_checkpoint(self.run_id, BEST, resume["model"])
        for done in history.epochs:
            if done.epoch not in self.logged:
                tracking.log_epoch(self.run_id, done.epoch, done.metrics())
                self.logged.add(done.epoch)

    def submit(self, is_best: bool) -> None:
        with interrupts.critical():  # a signal lands once this epoch's record is under way
            state = host_copy(self.snapshot(), self.device)
            covered, self.uncovered = self.uncovered, []
            self.writer.submit(functools.partial(self.write, is_best, state, covered))

    def write(self, is_best: bool, state: dict, covered: list[tuple[int, dict]]) -> None:
        write_checkpoint(self.run_id, LAST, state)
        if is_best:
            write_checkpoint(self.run_id, BEST, state["model"])
        for epoch, metrics in covered:
            if epoch not in self.logged:
                tracking.log_epoch(self.run_id, epoch, metrics)

    def close(self) -> None:
        """The last epochs since the last last.pt get one that covers them; then wait for all."""
        if self.uncovered:
            self.submit(False)
        self.writer.wait()

    def abandon(self) -> BaseException | None:
        """After an error or a signal: finish the record in flight (a stopped run keeps a whole
        last.pt and the metrics that go with it) and return what writing it raised, if anything."""
        return self.writer.wait(raise_error=False)


def check_parent(run_id: str):
    """The parent run, once it is known to exist (not deleted), be FINISHED and hold checkpoints/best.pt."""
    run = tracking.get_run(run_id)
    if run.info.lifecycle_stage == "deleted":  # `mlflow gc` may purge it, and the lineage with it
        raise LineageError(f"parent run {run_id} was deleted: restore it (`mlflow runs restore --run-id "
                           f"{run_id}`), or pass another parent_run_id")
    if run.info.status != "FINISHED":
        raise LineageError(f"parent run {run_id} is {run.info.status}, not FINISHED: wait for it, "
                           f"resume it with -P resume_run_id={run_id}, or pass a finished run")
    if not tracking.has_artifact(run_id, BEST):
        raise LineageError(f"parent run {run_id} has no {BEST}: pass the id of a training "
                           f"stage's run (train, baseline, tune_lr, ...)")
    return run


def holds_weights(run_id: str, keep_final: bool = False) -> bool:
    """Whether a FINISHED run still holds the weights a reuse hands on (best.pt; final.pt where
    the next phase starts from it): a run whose checkpoints were deleted is trained again, not
    reused into an error on every rerun."""
    wanted = (BEST, FINAL) if keep_final else (BEST,)
    return all(tracking.has_artifact(run_id, path) for path in wanted)


def parent_state(run_id: str) -> dict:
    """The parent's best.pt; refused when its weights are not finite (its training diverged):
    every run started from them would only train NaN."""
    state = load_weights(run_id, BEST)
    if not all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t) and t.is_floating_point()):
        raise LineageError(f"parent run {run_id}'s {BEST} holds weights that are not finite (its training "
                           f"diverged): pass another parent_run_id, or train it again at a lower lr")
    return state


def resume_state(run_id: str, arch: str) -> dict:
    """run_id's last.pt, loaded as plain data (never code) and checked to fit `arch` and the loop:
    a crafted, damaged or older file is refused here with one line, before anything is changed."""
    if not tracking.has_artifact(run_id, LAST):
        raise LineageError(
            f"run {run_id} has no {LAST}: it stopped before its first epoch ended, "
            f"so there is nothing to resume; start it again without resume_run_id")
    state = load_checkpoint(run_id, LAST)
    where = f"run {run_id}: {LAST}"
    found = state.get("format", "none") if isinstance(state, dict) else "none"
    if found != CHECKPOINT_FORMAT:
        reason = f"{where} is in checkpoint format {found}, this version resumes format {CHECKPOINT_FORMAT} only"
        raise CheckpointError(f"{reason}: start the run again without resume_run_id", reason)
    try:
        check_resumable(state, arch, f"{run_id}/{LAST}")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        reason = (f"{where} is malformed ({type(err).__name__}: {first_line(err)}): it was not written by this "
                  f"pipeline or is damaged")
        raise CheckpointError(f"{reason}; start the run again without resume_run_id", reason) from None
    return state


def check_resumable(state: dict, arch: str, source: str) -> None:
    """Apply every part of `state` to throwaway objects, as train.fit will (raises if one does not fit)."""
    model = models.build(arch)
    models.load_state(model, state["model"], arch, source)
    make_optimizer(model, Hyper(epochs=1, lr=1e-3)).load_state_dict(state["optimizer"])
    stopper = state["early_stopping"]
    if not isinstance(stopper.get("counter"), int) or \
            not isinstance(stopper.get("lowest_loss"), (int, float, type(None))):
        raise ValueError(f"early_stopping state {stopper!r:.80} is not a counter and a loss")
    if type(state["epoch"]) is not int or state["epoch"] < 1:
        raise ValueError(f"epoch {state['epoch']!r:.20} is not a whole number from 1")
    history = History.from_state(state["history"])
    if not history.epochs or history.epochs[-1].epoch != state["epoch"]:
        raise ValueError(f"history does not end at epoch {state['epoch']!r:.20}")
    set_rng_state(state["rng"], torch.Generator())  # train.fit sets them again from the same state
    cuda = state["rng"].get("cuda", [])  # applied in fit (it needs a GPU): only its form is checked here
    if not isinstance(cuda, list) or len(cuda) > 1 or \
            not all(torch.is_tensor(s) and s.dtype == torch.uint8 and s.dim() == 1 for s in cuda):
        raise ValueError(f"rng cuda state {cuda!r:.80} is not one device's state (a list of one byte tensor)")
