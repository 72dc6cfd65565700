"""One tracked training run: the shared piece every stage calls (never a second loop).

It logs the config, model summary and sample images, trains with train.fit, and hands each
epoch to small callbacks: the EpochRecorder (best.pt / last.pt, then the epoch's metrics, in a
background thread while the next epoch trains), the system-metrics pace, the heartbeat, the
test-only pause point, and whatever the caller adds (progress). The caller's stop hooks
(pruning) are asked before any of them, so a last.pt knows its run was pruned.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import batching, checkpoints, interrupts, lifecycle, models, pause, plots, sysmetrics, tracking, train
from . import data as data_mod
from .config import Config
from .errors import CheckpointError, TakenOver, first_line
from .keys import child_key
from .rng import seed_everything
from .runtime import Runtime


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


NODE_TAG = "ray_node_id"  # the Ray node a child trains on (executor=ray sets it; absent elsewhere)


@dataclass
class Stage:
    """A stage run as its children see it, handed down by the session (never a module global):
    its run, the one Runtime and code version it resolved (what its key and its children's keys
    say they ran), the earlier unfinished runs of the same stage whose children it takes over,
    and the model versions it registered (registry.Registered), withdrawn if it fails."""
    run_id: str
    runtime: Runtime
    adoptable: frozenset[str] = frozenset()
    registered: list = field(default_factory=list)  # registry.Registered
    code_version: str = ""

    def for_children(self) -> "Stage":
        """What a child task needs (no registrations: only the driver registers)."""
        return Stage(self.run_id, self.runtime, self.adoptable, code_version=self.code_version)


def hyper(cfg: Config, runtime: Runtime) -> train.Hyper:
    return train.Hyper(epochs=cfg.capped_epochs(cfg.epochs), lr=cfg.lr, alpha=cfg.alpha,
                       gamma=cfg.gamma, wd=cfg.wd, lr_schedule=cfg.lr_schedule, tol=cfg.tol, patience=cfg.patience,
                       log_every=cfg.log_every, compile=cfg.compile_mode, precision=runtime.precision)


def log(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def opened(run_id: str, end: bool = True):
    """End `run_id` FINISHED, or FAILED on an error (only if `end`: `mlflow run` ends its own
    run), or KILLED on SIGINT/SIGTERM always (`mlflow run` may die of the same signal). A run
    ended KILLED is named on the interrupt itself (interrupts.killed_runs), for the CLI's hint."""
    try:
        yield run_id
    except KeyboardInterrupt as stopped:  # later signals wait until this is done (interrupts)
        pause.point("cleanup", run_id=run_id)
        tracking.end_run(run_id, "KILLED")
        interrupts.killed_runs(stopped).append(run_id)
        raise
    except TakenOver as taken:  # a run taken over is another process's now: its status is that writer's
        if end and taken.run_id != run_id and lifecycle.taken_over(tracking.client().get_run(run_id)) is None:
            tracking.end_run(run_id, "FAILED")  # a run above it, still this process's: as on any error
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


def train_in_run(run_id: str, cfg: Config, dataset: data_mod.SVHNData, *, arch: str, runtime: Runtime,
                 init_state: dict | None = None, resume: dict | None = None,
                 stage_run_id: str = "", keep_final: bool = False,
                 stop_hooks: tuple[train.StopHook, ...] = (), callbacks: tuple[train.Callback, ...] = (),
                 task: str = "") -> RunResult:
    """Train `arch` inside the existing run `run_id` and log everything about it.

    Every epoch refreshes the heartbeat of this run (and of its stage run, unless it trains as
    Ray task `task`: the stage run's writer is then the driver), so no other process takes it
    over while it trains; last.pt is written every `checkpoint_every` epochs.
    keep_final: also keep the weights after the last epoch (checkpoints/final.pt), for a phase
    that continues from them.
    stop_hooks: train.StopHooks (pruning), asked before the epoch is recorded: True ends training
    after that epoch, the run still ends FINISHED, and its last.pt says so (a resume trains no more).
    callbacks: train.Callbacks after ours, once the epoch's record is handed to the writer
    (every record is written before this function returns).
    """
    client = tracking.client()
    beating = [r for r in (run_id, "" if task else stage_run_id) if r]
    lifecycle.beat(*beating, task=task)
    device = runtime.device
    if resume is None:
        tracking.log_config(run_id, cfg, runtime.params(cfg.bs, cfg.data_pipeline))
        client.set_tag(run_id, "arch", arch)
        tracking.log_datasets(run_id, dataset)
        log_static_artifacts(run_id, cfg, arch, dataset)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    generator = seed_everything(cfg.seed)
    model = models.build(arch)
    if init_state is not None:
        models.load_state(model, init_state, arch, "of the parent run")
    # channels_last: measured faster on this CPU (oneDNN) and on CUDA GPUs alike
    model = model.to(device, memory_format=torch.channels_last)
    eval_bs = runtime.eval_batch_size(cfg.bs)
    train_batches = batching.batches(cfg, dataset, "train", device, cfg.bs, generator, channels_last=True)
    test_batches = batching.batches(cfg, dataset, "test", device, eval_bs, None, channels_last=True)
    val_batches = batching.batches(cfg, dataset, "val", device, eval_bs, None, channels_last=True) \
        if dataset.val is not None else None
    recorder = checkpoints.EpochRecorder(run_id, device, cfg.checkpoint_every,
                                         tracking.logged_steps(run_id, "test_acc") if resume else set())
    if resume is not None:
        recorder.catch_up(resume)
    train_batches = pause.batches(train_batches, cfg.stage, run_id, before=recorder.writer.wait)
    run_hyper = hyper(cfg, runtime)
    schedule = "" if cfg.lr_schedule == "constant" else f" ({cfg.lr_schedule})"
    log(f"run {run_id}: {arch}, {dataset.n_train} train / {dataset.n_val} val / {dataset.n_test} test images, "
        f"{run_hyper.epochs} epochs, bs {cfg.bs} (eval {eval_bs}), lr {cfg.lr:g}{schedule}, gamma {cfg.gamma:g}, "
        f"wd {cfg.wd:g}, device {device}, {run_hyper.precision}, pipeline {cfg.data_pipeline}")
    system_metrics = sysmetrics.SystemMetrics(run_id, sysmetrics.guess_epoch_s(
        device.type, dataset.n_train, dataset.n_val + dataset.n_test))

    def still_writer(end: train.EpochEnd) -> bool:  # first of the stop hooks: before a pruner hears of the epoch
        for writing in beating:  # the stage run too, where this process writes it (not as a Ray task)
            lifecycle.check_still_writer(writing)
        return False

    def heartbeat(end: train.EpochEnd) -> None:
        system_metrics.epoch_took(end.result.epoch_time_s)
        lifecycle.beat(*beating, task=task)
        pause.point("epoch", cfg.stage, run_id, before=recorder.writer.wait)

    try:
        with lifecycle.heartbeat(*beating, task=task):  # also between epochs: a long epoch is not a dead writer
            try:
                history = train.fit(model, train_batches, test_batches, run_hyper, device, generator,
                                    val_batches=val_batches, resume=resume, log=log,
                                    stop_hooks=(still_writer, *stop_hooks), callbacks=(recorder, heartbeat, *callbacks))
                recorder.close()  # the last epoch's record, before the totals and FINISHED
            except BaseException:
                # Ctrl-C, SIGTERM or an error (in close() too): the record in flight is finished
                # first, so a stopped run keeps a whole last.pt and the metrics that go with it
                failed = recorder.abandon()
                if failed is not None:
                    log(f"run {run_id}: writing the last epoch's record failed too: {type(failed).__name__}: "
                        f"{first_line(failed, None)}")
                raise
    finally:
        system_metrics.stop()
    result = RunResult(run_id, client.get_run(run_id).info.run_name, arch, history.best_acc,
                       history.best_epoch, history, history.selected_on, history.test_acc_at_best,
                       {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if keep_final else None)
    if resume is None or 0 not in tracking.logged_steps(run_id, "total_time_s"):  # a kill after them: once
        tracking.log_epoch(run_id, 0, {**result.metrics(), "total_time_s": history.total_time_s})
    client.set_tag(run_id, "stopped_early", str(history.stopped_early).lower())
    client.set_tag(run_id, "diverged", str(history.diverged).lower())
    client.set_tag(run_id, "selected_on", history.selected_on)
    if keep_final:
        checkpoints.save_checkpoint(run_id, checkpoints.FINAL, result.final_state)
    with tempfile.TemporaryDirectory() as tmp:
        path = plots.loss(history.column("train_loss"), history.column("test_loss"),
                          Path(tmp) / "loss.png",
                          history.column("val_loss") if dataset.val is not None else None)
        client.log_artifact(run_id, str(path), "plots")
    return result


def child_run(stage: Stage, name: str, cfg: Config, dataset: data_mod.SVHNData, *,
              arch: str, init_state: dict | None, tags: dict[str, str], init_source: str = "",
              keep_final: bool = False, stop_hooks: tuple[train.StopHook, ...] = (),
              callbacks: tuple[train.Callback, ...] = (), task: str = "") -> RunResult:
    """A nested run under the stage's run: one repeat, sweep point or phase (its own epochs
    and settings travel in `cfg`, so what it logs is what it trains).

    A child with the same key (keys.child_key) under this stage run, or under an earlier run
    of the same stage that did not finish (stage.adoptable), is not trained again: a FINISHED
    one is reused as it is, an unfinished one resumed from its last.pt, both moved under this
    stage run.
    """
    client = tracking.client()
    parent_run_id, runtime = stage.run_id, stage.runtime
    key = child_key(cfg, dataset.digest, runtime, name, init_source)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    found = lifecycle.find_child(experiment_id, key, {parent_run_id, *stage.adoptable})
    finished_run = found is not None and found.info.status == "FINISHED"
    if finished_run and not checkpoints.holds_weights(found.info.run_id, keep_final):
        log(f"{name}: FINISHED child run {found.info.run_id} has lost its weights (deleted?): training it again")
        finished_run = False
    resumable = found is not None and not finished_run and tracking.has_artifact(found.info.run_id, checkpoints.LAST)
    if finished_run or resumable:
        # the key says it matches: its own record must say so too, before it is reused or resumed
        lifecycle.check_same_record(found, dataset.digest, runtime)
    if finished_run:
        adopt(found.info.run_id, parent_run_id)
        log(f"{name}: reusing FINISHED child run {found.info.run_id} (same key {key})")
        return result_from_record(found.info.run_id, arch, keep_final)
    trained = dict(arch=arch, runtime=runtime, stage_run_id=parent_run_id, keep_final=keep_final,
                   stop_hooks=stop_hooks, callbacks=callbacks, task=task)
    state = resumable_state(found.info.run_id, arch, name) if resumable else None
    if state is not None:
        child_id = found.info.run_id
        lifecycle.claim(found, cfg, "resumed", task=task)
        adopt(child_id, parent_run_id)
        for key, value in tags.items():  # this attempt's (executor=ray: the node that trains it now)
            client.set_tag(child_id, key, value)
        if NODE_TAG in found.data.tags and NODE_TAG not in tags:  # trained on Ray before, here now
            client.delete_tag(child_id, NODE_TAG)
        log(f"{name}: resuming child run {child_id} after epoch {state['epoch']}")
        client.update_run(child_id, status="RUNNING")
        with opened(child_id):
            result = train_in_run(child_id, cfg, dataset, resume=state, **trained)
        finished(child_id)  # once FINISHED: a kill before that still finds last.pt
        return result
    if found is not None:  # stopped before its first epoch ended, or its last.pt is unusable: nothing to keep
        lifecycle.claim(found, cfg, "replaced", task=task)
        if found.info.status == "RUNNING":
            tracking.end_run(found.info.run_id, "KILLED")
        tracking.supersede(found.info.run_id, key)
    run_id = create_child(parent_run_id, name, {"stage": cfg.stage, "training_key": key, **tags})
    with opened(run_id):
        result = train_in_run(run_id, cfg, dataset, init_state=init_state, **trained)
    finished(run_id)
    return result


def resumable_state(child_id: str, arch: str, name: str) -> dict | None:
    """The child's last.pt as resume_state checks it, or None when it cannot be resumed (damaged,
    not plain data, another format): refused unread, the child is trained again from its start, as
    the stage's rerun would otherwise stop at the same file every time."""
    try:
        return checkpoints.resume_state(child_id, arch)
    except CheckpointError as err:
        log(f"{name}: child run {child_id} cannot be resumed ({err.reason}); training it again from its start")
        return None


def adopt(child_id: str, parent_run_id: str) -> None:
    """Move a child of an earlier stage run under the stage run that continues it. A FINISHED
    earlier run (autotune's study goes on across commands) is no longer whole once a child has
    left it: it is out of reuse from then on, whether or not this run finishes."""
    client = tracking.client()
    earlier = client.get_run(child_id).data.tags.get("mlflow.parentRunId")
    if earlier == parent_run_id:
        return
    client.set_tag(child_id, "mlflow.parentRunId", parent_run_id)
    if earlier:
        tracking.supersede_finished(earlier)


def finished(run_id: str) -> None:
    """last.pt is only for resuming: a run that trained to its end drops it, and what a killed
    attempt left half-written."""
    tracking.delete_artifact(run_id, checkpoints.LAST)
    checkpoints.drop_stale_temps(run_id)


def result_from_record(run_id: str, arch: str, keep_final: bool = False) -> RunResult:
    """A FINISHED child's result, as MLflow recorded it (no training)."""
    history = lifecycle.history_from_record(run_id)
    final = checkpoints.load_weights(run_id, checkpoints.FINAL) if keep_final else None
    run = tracking.client().get_run(run_id)
    return RunResult(run_id, run.info.run_name, run.data.tags.get("arch", arch), history.best_acc,
                     history.best_epoch, history, history.selected_on, history.test_acc_at_best, final)
