"""One tracked training run: the shared piece every stage calls (never a second loop).

It logs the config, model summary and sample images, trains with train.fit, and after every
epoch writes best.pt / last.pt atomically and logs the epoch's metrics in one batch, in a
background thread while the next epoch trains; while it trains, MLflow's system/ metrics (CPU,
memory, GPU) are sampled into the run.
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import data as data_mod
from . import interrupts, lifecycle, models, pause, plots, tracking, train
from .config import Config

# Runs a SIGINT/SIGTERM ended, innermost first: __main__ names the outermost in its hint.
KILLED_RUNS: list[str] = []


@dataclass
class RunResult:
    run_id: str
    name: str
    arch: str
    best_acc: float                 # accuracy on the selection split (val, or test as in the seed)
    best_epoch: int
    history: train.History
    selected_on: str = "test"
    test_acc_at_best: float = float("nan")
    final_state: dict | None = None  # the weights after the last epoch, in memory

    def metrics(self) -> dict[str, float]:
        """What a run's result logs: the selection figure, and test at that checkpoint."""
        return {f"best_{self.selected_on}_acc": self.best_acc, "best_epoch": self.best_epoch,
                "test_acc_at_best": self.test_acc_at_best}


def hyper(cfg: Config, device) -> train.Hyper:
    return train.Hyper(epochs=cfg.capped_epochs(cfg.epochs), lr=cfg.lr, alpha=cfg.alpha,
                       gamma=cfg.gamma, wd=cfg.wd, tol=cfg.tol, patience=cfg.patience,
                       log_every=cfg.log_every, compile=cfg.compile_mode,
                       precision=train.resolve_precision(cfg.precision, device))


def log(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def opened(run_id: str, end: bool = True):
    """End `run_id` FINISHED, or FAILED on an error (only if `end`: `mlflow run` ends its own
    run), or KILLED on SIGINT/SIGTERM always (`mlflow run` may die of the same signal)."""
    try:
        yield run_id
    except KeyboardInterrupt:  # later signals wait until this is done (interrupts)
        pause.point("cleanup", run_id=run_id)
        tracking.end_run(run_id, "KILLED")
        KILLED_RUNS.append(run_id)
        raise
    except BaseException:
        if end:
            tracking.end_run(run_id, "FAILED")
        raise
    else:
        if end:
            tracking.end_run(run_id, "FINISHED")


def create_child(parent_run_id: str, name: str, tags: dict[str, str]) -> str:
    parent = tracking.client().get_run(parent_run_id)
    lineage = {k: v for k, v in parent.data.tags.items() if k == tracking.LINEAGE_DIGEST}  # the stage's
    run = tracking.client().create_run(parent.info.experiment_id, run_name=name,
                                       tags={"mlflow.parentRunId": parent_run_id,
                                             **tracking.record_tags(), **lineage, **tags})
    return run.info.run_id


def log_static_artifacts(run_id: str, cfg: Config, arch: str, dataset: data_mod.SVHNData) -> None:
    client = tracking.client()
    client.log_text(run_id, models.summary(arch), "model_summary.txt")
    with tempfile.TemporaryDirectory() as tmp:
        path = plots.samples(dataset.train_images.numpy(), dataset.train_labels.numpy(),
                             Path(tmp) / "samples.png", seed=cfg.seed)
        client.log_artifact(run_id, str(path), "plots")


def train_in_run(run_id: str, cfg: Config, dataset: data_mod.SVHNData, *, arch: str,
                 init_state: dict | None = None, resume: dict | None = None,
                 stage_run_id: str = "", keep_final: bool = False,
                 epoch_hook: Callable[[train.EpochResult], bool | None] | None = None) -> RunResult:
    """Train `arch` inside the existing run `run_id` and log everything about it.

    Every epoch refreshes the heartbeat of this run (and of its stage run), so no other process
    takes it over while it trains; last.pt is written every `checkpoint_every` epochs.
    keep_final: also keep the weights after the last epoch (checkpoints/final.pt), for a phase
    that continues from them.
    epoch_hook(result): called after each epoch, once its record (checkpoints, then metrics) is
    handed to the background writer (every record is written before this function returns);
    True ends training after that epoch, and the run still ends FINISHED.
    """
    client = tracking.client()
    # a Ray worker beats its child only: the stage run's writer is the driver (stages.run)
    beating = [r for r in (run_id, "" if lifecycle.OWNER["task"] else stage_run_id) if r]
    lifecycle.beat(*beating)
    device, precision = train.resolve_runtime(cfg.device, cfg.precision)
    if resume is None:
        tracking.log_config(run_id, cfg, tracking.runtime_params(device, precision, cfg))
        client.set_tag(run_id, "arch", arch)
        tracking.log_datasets(run_id, dataset)
        log_static_artifacts(run_id, cfg, arch, dataset)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    generator = train.seed_everything(cfg.seed)
    model = models.build(arch)
    if init_state is not None:
        models.load_state(model, init_state, arch, "of the parent run")
    # channels_last: measured faster on this CPU (oneDNN) and on CUDA GPUs alike
    model = model.to(device, memory_format=torch.channels_last)
    train_batches = data_mod.batches(cfg, dataset, "train", device, cfg.bs, generator, channels_last=True)
    eval_bs = cfg.eval_batch_size(device.type)
    test_batches = data_mod.batches(cfg, dataset, "test", device, eval_bs, None, channels_last=True)
    val_batches = data_mod.batches(cfg, dataset, "val", device, eval_bs, None, channels_last=True) \
        if dataset.val is not None else None
    already_logged = tracking.logged_steps(run_id, "test_acc") if resume else set()
    if resume is not None:  # killed between writing last.pt and logging what it covers: log it now, once
        for done in train.History.from_state(resume["history"]).epochs:
            if done.epoch not in already_logged:
                tracking.log_epoch(run_id, done.epoch, done.metrics())
                already_logged.add(done.epoch)

    writer = tracking.CheckpointWriter()
    train_batches = pause.batches(train_batches, cfg.stage, run_id, before=writer.wait)
    # Epochs trained since the last last.pt: their metrics are logged only once a last.pt covers
    # them, so a kill never leaves a logged epoch that a resume would train (and log) again.
    uncovered: list[tuple[int, dict]] = []
    latest = {}

    def record(is_best: bool, state: dict | None, covered: list[tuple[int, dict]]) -> None:
        """An epoch's record, in this order: best.pt, last.pt, then the metrics of the epochs
        that last.pt covers (with checkpoint_every > 1, several)."""
        if is_best:
            tracking.write_checkpoint(run_id, tracking.BEST, state["model"])
        if state is not None:
            tracking.write_checkpoint(run_id, tracking.LAST, state)
        for epoch, metrics in covered:
            if epoch not in already_logged:
                tracking.log_epoch(run_id, epoch, metrics)

    def submit_record(is_best: bool, snapshot) -> None:
        with interrupts.critical():  # a signal lands once this epoch's record is under way
            state = tracking.host_copy(snapshot(), device)
            covered = uncovered[:]
            uncovered.clear()
            writer.submit(functools.partial(record, is_best, state, covered))

    def on_epoch(result: train.EpochResult, is_best: bool, snapshot) -> None:
        writer.wait()  # the previous epoch's record first: one at a time, in order
        uncovered.append((result.epoch, result.metrics()))
        latest["snapshot"] = snapshot
        # last.pt with best.pt too, so the two never disagree about which epoch is behind them
        if is_best or result.epoch % cfg.checkpoint_every == 0:
            submit_record(is_best, snapshot)
        system_metrics.epoch_took(result.epoch_time_s)
        lifecycle.beat(*beating)
        pause.point("epoch", cfg.stage, run_id, before=writer.wait)
        return bool(epoch_hook(result)) if epoch_hook else False

    run_hyper = hyper(cfg, device)
    log(f"run {run_id}: {arch}, {dataset.n_train} train / {dataset.n_val} val / {dataset.n_test} test images, "
        f"{run_hyper.epochs} epochs, bs {cfg.bs} (eval {eval_bs}), lr {cfg.lr:g}, gamma {cfg.gamma:g}, wd {cfg.wd:g}, "
        f"device {device}, {run_hyper.precision}, pipeline {cfg.data_pipeline}")
    system_metrics = tracking.SystemMetrics(run_id, tracking.guess_epoch_s(
        device.type, dataset.n_train, dataset.n_val + dataset.n_test))
    try:
        with lifecycle.heartbeat(*beating):  # also between epochs: a long epoch is not a dead writer
            try:
                history = train.fit(model, train_batches, test_batches, run_hyper, device, generator,
                                    val_batches=val_batches, resume=resume, on_epoch=on_epoch, log=log)
                if uncovered:  # the last epochs, since the last last.pt: one that covers them
                    submit_record(False, latest["snapshot"])
                writer.wait()  # the last epoch's record, before the totals and FINISHED
            except BaseException:
                # Ctrl-C, SIGTERM or an error (in the last wait too): the epoch being recorded is
                # finished first, so a stopped run keeps a whole last.pt and the metrics that go with it
                failed = writer.wait(raise_error=False)
                if failed is not None:
                    log(f"run {run_id}: writing the last epoch's record failed too: {type(failed).__name__}: {failed}")
                raise
    finally:
        system_metrics.stop()
    result = RunResult(run_id, client.get_run(run_id).info.run_name, arch, history.best_acc,
                       history.best_epoch, history, history.selected_on, history.test_acc_at_best,
                       {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    tracking.log_epoch(run_id, 0, {**result.metrics(), "total_time_s": history.total_time_s})
    client.set_tag(run_id, "stopped_early", str(history.stopped_early).lower())
    client.set_tag(run_id, "selected_on", history.selected_on)
    if keep_final:
        tracking.save_checkpoint(run_id, tracking.FINAL, result.final_state)
    with tempfile.TemporaryDirectory() as tmp:
        path = plots.loss(history.column("train_loss"), history.column("test_loss"),
                          Path(tmp) / "loss.png",
                          history.column("val_loss") if dataset.val is not None else None)
        client.log_artifact(run_id, str(path), "plots")
    return result


def child_run(parent_run_id: str, name: str, cfg: Config, dataset: data_mod.SVHNData, *,
              arch: str, init_state: dict | None, tags: dict[str, str], init_source: str = "",
              keep_final: bool = False, epoch_hook=None) -> RunResult:
    """A nested run under the stage's run: one repeat, sweep point or phase (its own epochs
    and settings travel in `cfg`, so what it logs is what it trains).

    A child with the same key (lifecycle.child_key) under this stage run, or under an earlier
    run of the same stage that did not finish (lifecycle.ADOPTABLE), is not trained again: a
    FINISHED one is reused as it is, an unfinished one resumed from its last.pt, both moved
    under this stage run.
    """
    client = tracking.client()
    key = lifecycle.child_key(cfg, dataset.digest, name, init_source)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    found = lifecycle.find_child(experiment_id, key, {parent_run_id, *lifecycle.ADOPTABLE})
    finished_run = found is not None and found.info.status == "FINISHED"
    resumable = found is not None and not finished_run and tracking.has_artifact(found.info.run_id, tracking.LAST)
    if finished_run or resumable:
        # the key says it matches: its own record must say so too, before it is reused or resumed
        device, precision = train.resolve_runtime(cfg.device, cfg.precision)
        lifecycle.check_same_record(found, dataset.digest, device.type, precision)
    if finished_run:
        adopt(found.info.run_id, parent_run_id)
        log(f"{name}: reusing FINISHED child run {found.info.run_id} (same key {key})")
        return result_from_record(found.info.run_id, arch, keep_final)
    if resumable:
        child_id = found.info.run_id
        state = resume_state(child_id, arch)
        lifecycle.claim(found, cfg, "resumed")
        adopt(child_id, parent_run_id)
        log(f"{name}: resuming child run {child_id} after epoch {state['epoch']}")
        client.update_run(child_id, status="RUNNING")
        with opened(child_id):
            result = train_in_run(child_id, cfg, dataset, arch=arch, resume=state,
                                  stage_run_id=parent_run_id, keep_final=keep_final,
                                  epoch_hook=epoch_hook)
        finished(child_id)  # once FINISHED: a kill before that still finds last.pt
        return result
    if found is not None:  # stopped before its first epoch ended: nothing to keep
        lifecycle.claim(found, cfg, "replaced")
        if found.info.status == "RUNNING":
            tracking.end_run(found.info.run_id, "KILLED")
        client.set_tag(found.info.run_id, "training_key", f"superseded-{key}")
    run_id = create_child(parent_run_id, name, {"stage": cfg.stage, "training_key": key, **tags})
    with opened(run_id):
        result = train_in_run(run_id, cfg, dataset, arch=arch, init_state=init_state,
                              stage_run_id=parent_run_id, keep_final=keep_final, epoch_hook=epoch_hook)
    finished(run_id)
    return result


def adopt(child_id: str, parent_run_id: str) -> None:
    """Move a child of an unfinished earlier stage run under the stage run that continues it."""
    if tracking.client().get_run(child_id).data.tags.get("mlflow.parentRunId") != parent_run_id:
        tracking.client().set_tag(child_id, "mlflow.parentRunId", parent_run_id)


def finished(run_id: str) -> None:
    """last.pt is only for resuming: a run that trained to its end drops it."""
    tracking.delete_artifact(run_id, tracking.LAST)


def result_from_record(run_id: str, arch: str, keep_final: bool = False) -> RunResult:
    """A FINISHED child's result, as MLflow recorded it (no training)."""
    history = lifecycle.history_from_record(run_id)
    final = tracking.load_weights(run_id, tracking.FINAL) if keep_final else None
    run = tracking.client().get_run(run_id)
    return RunResult(run_id, run.info.run_name, run.data.tags.get("arch", arch), history.best_acc,
                     history.best_epoch, history, history.selected_on, history.test_acc_at_best, final)


def resume_state(run_id: str, arch: str) -> dict:
    """run_id's last.pt, loaded as plain data (never code) and checked to fit `arch` and the loop:
    a crafted, damaged or older file is refused here with one line, before anything is changed."""
    if not tracking.has_artifact(run_id, tracking.LAST):
        raise tracking.LineageError(
            f"run {run_id} has no {tracking.LAST}: it stopped before its first epoch ended, "
            f"so there is nothing to resume; start it again without resume_run_id")
    state = tracking.load_checkpoint(run_id, tracking.LAST)
    where = f"run {run_id}: {tracking.LAST}"
    found = state.get("format", "none") if isinstance(state, dict) else "none"
    if found != train.CHECKPOINT_FORMAT:
        raise models.CheckpointError(
            f"{where} is in checkpoint format {found}, this version resumes format "
            f"{train.CHECKPOINT_FORMAT} only: start the run again without resume_run_id")
    try:
        check_resumable(state, arch, f"{run_id}/{tracking.LAST}")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise models.CheckpointError(
            f"{where} is malformed ({type(err).__name__}: {reason}): it was not written by this "
            f"pipeline or is damaged; start the run again without resume_run_id") from None
    return state


def check_resumable(state: dict, arch: str, source: str) -> None:
    """Apply every part of `state` to throwaway objects, as train.fit will (raises if one does not fit)."""
    model = models.build(arch)
    models.load_state(model, state["model"], arch, source)
    train.make_optimizer(model, train.Hyper(epochs=1, lr=1e-3)).load_state_dict(state["optimizer"])
    stopper = state["early_stopping"]
    if not isinstance(stopper.get("counter"), int) or \
            not isinstance(stopper.get("lowest_loss"), (int, float, type(None))):
        raise ValueError(f"early_stopping state {stopper!r:.80} is not a counter and a loss")
    history = train.History.from_state(state["history"])
    if not history.epochs or history.epochs[-1].epoch != state["epoch"]:
        raise ValueError(f"history does not end at epoch {state['epoch']!r:.20}")
    train.set_rng_state(state["rng"], torch.Generator())  # train.fit sets them again from the same state
