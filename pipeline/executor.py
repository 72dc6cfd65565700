"""Where a stage's children train: one after another in this process (executor=local), or each
as a Ray task on a local Ray or a cluster (executor=ray). Either way every child is trained by
runner.child_run, so the MLflow record is the same; the stage then aggregates as usual.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Hashable

from . import data as data_mod
from . import interrupts, keys, lifecycle, pause, runtime, tracking, train
from .cluster import TRACKING_ENV, check_cluster, shared, tracking_uri
from .config import Config
from .errors import ChildFailed, ConfigError, NotLikeTheDriver, TakenOver, first_line
from .runner import NODE_TAG, RunResult, Stage, child_run, log
from .urls import scrubbed


@dataclass
class ChildSpec:
    """One child run of a stage: its name, its own config, and where its weights come from."""
    name: str
    cfg: Config
    arch: str
    init_state: dict | None = None
    tags: dict[str, str] = field(default_factory=dict)
    init_source: str = ""
    keep_final: bool = False
    # builds a train.StopHook (pruning) where the child trains; picklable for Ray
    make_hook: Callable[[], train.StopHook] | None = None


def train_child(stage: Stage, spec: ChildSpec, dataset: data_mod.SVHNData,
                progress: train.Callback | None = None, task: str = "") -> RunResult:
    """`spec` as a child run of `stage`, with its own hook (pruning) and the caller's progress."""
    return child_run(stage, spec.name, spec.cfg, dataset, arch=spec.arch,
                     init_state=spec.init_state, tags=spec.tags, init_source=spec.init_source,
                     keep_final=spec.keep_final, stop_hooks=(spec.make_hook(),) if spec.make_hook else (),
                     callbacks=(progress,) if progress else (), task=task)


# next_child() -> (its key, its spec), or None when no child is left to start
NextChild = Callable[[], "tuple[Hashable, ChildSpec] | None"]


def stream(cfg: Config, stage: Stage, dataset: data_mod.SVHNData, next_child: NextChild,
           on_result: Callable[[Hashable, RunResult], None], slots: int) -> None:
    """Train children as they are asked for, under the stage run: locally one after another; on
    Ray, `slots` at once, a new one asked for as soon as one ends (so no slot idles while work
    is left). on_result(key, result) is called as each ends, in the order they end."""
    if cfg.executor == "ray":
        return stream_on_ray(cfg, stage, dataset, next_child, on_result, slots)
    while (item := next_child()) is not None:
        key, spec = item
        on_result(key, train_child(stage, spec, dataset))


def run_children(cfg: Config, stage: Stage, specs: list[ChildSpec],
                 dataset: data_mod.SVHNData) -> list[RunResult]:
    """Train every child of `specs` under the stage run (all at once on Ray); results in the
    order of `specs`."""
    queue, results = iter(enumerate(specs)), {}
    stream(cfg, stage, dataset, lambda: next(queue, None), results.__setitem__, max(len(specs), 1))
    return [results[i] for i in range(len(specs))]


# -- executor=ray -------------------------------------------------------------------------------------

class ProgressBoard:
    """Per-child progress that workers report and the driver shows (a Ray actor)."""

    def __init__(self):
        self.updates: list[tuple[str, str]] = []

    def update(self, name: str, text: str) -> None:
        self.updates.append((name, text))

    def read(self, since: int) -> list[tuple[str, str]]:
        return self.updates[since:]


def like_the_driver(stage: Stage, cfg: Config, node: str) -> None:
    """A task trains only what its stage is keyed on: the driver's code version, and the device
    type and precision the driver resolved, which this node must resolve alike."""
    differ = []
    code = keys.code_version()
    if stage.code_version and code != stage.code_version:
        differ.append(f"code version {code} here, {stage.code_version} on the driver")
    try:
        mine = runtime.of(cfg)
        here = f"{mine.device_type}/{mine.precision}"
    except ConfigError as err:
        here = f"none ({err})"
    driver = f"{stage.runtime.device_type}/{stage.runtime.precision}"
    if here != driver:
        differ.append(f"device/precision {here} here, {driver} on the driver")
    if differ:
        raise NotLikeTheDriver(f"node {node[:8]} refused to train: {'; '.join(differ)}; run the driver's "
                               f"checkout on every node, and pass -P device=... -P precision=... that "
                               f"the driver and every node resolve alike (CPUs that differ in bf16 "
                               f"support: -P precision=fp32)")


def ray_task(task_id: str) -> str:
    """A Ray task as a writer's stamp names it (lifecycle.stamp's `task`): retries keep the id."""
    return f"ray-task:{task_id}"


def ray_child(env: dict[str, str], stage: Stage, spec: ChildSpec, init_state, dataset, board) -> RunResult:
    """One child on a Ray worker: tracked by the same child_run as executor=local."""
    import ray

    os.environ.pop("MLFLOW_RUN_ID", None)  # else it silently becomes every run's parent (mlflow#15713)
    os.environ.update(env)
    runtime.tune_allocator()  # a Ray worker is not started by our CLI
    context = ray.get_runtime_context()
    node = context.get_node_id()
    like_the_driver(stage, spec.cfg, node)  # before any run is made or touched
    spec = replace(spec, init_state=init_state, tags={**spec.tags, NODE_TAG: node})

    def show(text: str, wait: bool = False) -> None:
        """Progress is best-effort: a lost board never fails the child."""
        with contextlib.suppress(Exception):
            sent = board.update.remote(spec.name, text)
            if wait:  # it, and every update before it, is on the board before the driver sees the result
                ray.get(sent, timeout=30)

    def progress(end: train.EpochEnd) -> None:
        result = end.result
        acc = result.val_acc if result.val_acc is not None else result.test_acc
        split = "val" if result.val_acc is not None else "test"
        show(f"epoch {result.epoch}/{spec.cfg.epochs}  {split}_acc {acc:6.2f}%  "
             f"{result.train_images_per_s:,.0f} img/s  node {node[:8]}")

    show(f"starting on node {node[:8]}")
    result = train_child(stage, spec, dataset, progress, task=ray_task(context.get_task_id()))
    show(f"done: best {result.selected_on}_acc {result.best_acc:.2f}% at epoch {result.best_epoch}", wait=True)
    return result


class Display:
    """One line per child: on a terminal the lines update in place; elsewhere each update is a line."""

    def __init__(self, board):
        self.names: list[str] = []
        self.board, self.seen, self.drawn, self.width = board, 0, 0, 0
        self.reading = None  # the board's answer, asked for and not yet in
        self.rows: dict[str, str] = {}
        self.tty = sys.stdout.isatty()

    def add(self, name: str) -> None:
        self.names.append(name)
        self.width = max(self.width, len(name))

    def flush(self) -> None:
        """Everything the board still has, at the end (each read waits up to 30 s)."""
        while self.board is not None:
            before = self.seen
            self.refresh(wait=30)
            if self.reading is not None or self.seen == before:  # slow, or nothing new
                return

    def refresh(self, wait: float = 0.0) -> None:
        """Show what the board has. Best-effort: it waits at most `wait` seconds for the board (a
        slow one is asked again next time, so a free slot is never held up), and a lost board
        ends the display, never the children."""
        import ray

        if self.board is None:
            return
        try:
            if self.reading is None:
                self.reading = self.board.read.remote(self.seen)
            ready, _ = ray.wait([self.reading], timeout=wait)
            if not ready:
                return
            updates = ray.get(self.reading)
        except ray.exceptions.RayError as err:
            log(f"[ray] progress display lost ({type(err).__name__}): the children train on; their runs show progress")
            self.board = None
            return
        self.reading = None
        self.seen += len(updates)
        for name, text in updates:
            self.rows[name] = text
            if not self.tty:
                log(f"[ray] {name:<{self.width}}  {text}")
        if self.tty and updates:
            lines = [f"{n:<{self.width}}  {self.rows.get(n, 'waiting')}" for n in self.names]
            sys.stdout.write("\x1b[F" * self.drawn + "".join(f"\x1b[2K{line}\n" for line in lines))
            sys.stdout.flush()
            self.drawn = len(lines)


WRITER_CHECK_S = 10.0  # how often a driver asks whether its stage run was taken over (a task: every epoch)


def stream_on_ray(cfg: Config, stage: Stage, dataset: data_mod.SVHNData, next_child: NextChild,
                  on_result: Callable[[Hashable, RunResult], None], slots: int) -> None:
    """Each child a Ray task (cpus_per_trial, gpus_per_trial, spread over the nodes, retried
    max_retries times when its worker dies), at most `slots` in flight; this process waits,
    shows progress, hands each result on as it comes and starts the next child at once.
    Once another process takes over the stage run, or a child (lifecycle.check_still_writer),
    the driver stops its tasks with TakenOver and leaves that writer's runs as they are."""
    import ray

    check_cluster(cfg)  # the CLI checked this before any run existed; in-process callers did not
    env = {k: v for k, v in os.environ.items() if k in TRACKING_ENV + pause.ENV}
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    data_ref = shared(dataset, f"data-{dataset.digest}")
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    task = ray.remote(ray_child)
    placement = dict(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial, max_retries=cfg.max_retries,
                     retry_exceptions=False, scheduling_strategy="SPREAD")
    states = {}  # a parent's weights go to the object store once for all its children
    in_flight: dict = {}  # ObjectRef -> (key, spec): every task started and not yet ended
    launched: set[str] = set()  # every task this driver started (lifecycle.stamp's `task`): its writers
    display = Display(board)

    def fill() -> None:
        while len(in_flight) < slots and (item := next_child()) is not None:
            key, spec = item
            if spec.init_state is not None and id(spec.init_state) not in states:
                # the weights are held beside their ref, so their id is never reused meanwhile
                states[id(spec.init_state)] = (spec.init_state, ray.put(spec.init_state))
            state_ref = states[id(spec.init_state)][1] if spec.init_state is not None else None
            ref = task.options(name=spec.name, **placement).remote(
                env, stage.for_children(), replace(spec, init_state=None), state_ref, data_ref, board)
            in_flight[ref] = (key, spec)
            launched.add(ray_task(ref.task_id().hex()))
            display.add(spec.name)

    try:
        fill()
        checked = time.monotonic()
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            display.refresh()
            if time.monotonic() - checked >= WRITER_CHECK_S:
                still_writer(stage.run_id)
                checked = time.monotonic()
            for ref in done:
                key, spec = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    if isinstance(getattr(err, "cause", None), TakenOver):
                        raise err.cause from None  # its run is its new writer's; the siblings stop below
                    failed = ChildFailed(failure_line(spec.name, err, cfg))
                    with interrupts.critical():  # its siblings still in flight: named for the CLI's hint
                        interrupts.killed_runs(failed).extend(stop(list(in_flight), stage,
                                                                   {spec.name: "FAILED"}, launched))
                    raise failed from None
                on_result(key, result)
            fill()
        display.flush()  # the last updates (each task waited for its own to arrive)
    except ChildFailed:
        raise  # stopped above, the failed child FAILED
    except BaseException as stopped:
        # Ctrl-C, SIGTERM, or any error in this driver (the tracking server, Ray, a bug): no task
        # outlives it and no child run stays RUNNING; the CLI prints the command that continues
        # (not after a takeover of the stage run: its new writer continues them)
        with interrupts.critical():  # `mlflow run` follows Ctrl-C with SIGTERM: finish this first
            ended = stop(list(in_flight), stage, {}, launched)
            if not (isinstance(stopped, TakenOver) and stopped.run_id == stage.run_id):
                interrupts.killed_runs(stopped).extend(ended)
        raise
    finally:
        with contextlib.suppress(Exception):  # the board may be gone already
            ray.kill(board)


def still_writer(run_id: str) -> None:
    """TakenOver once another process has claimed the stage run; the store unreachable for a
    moment stops nothing (the children train on, and it is asked again at the next turn)."""
    try:
        lifecycle.check_still_writer(run_id)
    except TakenOver:
        raise
    except Exception as err:  # noqa: BLE001 - as the heartbeat thread misses a beat
        log(f"[ray] could not read stage run {run_id} ({type(err).__name__}: {first_line(err)}): asked again later")


def failure_line(name: str, err: Exception, cfg: Config) -> str:
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        text = str(cause).strip().splitlines()
        return f"child '{name}' failed: {type(cause).__name__}: {scrubbed(text[-1])[:400] if text else ''}"
    return (f"child '{name}' failed: its worker died {cfg.max_retries + 1} times "
            f"({type(err).__name__}); run the same command again to resume it, or raise -P max_retries")


def stop(pending: list, stage: Stage, status_of: dict[str, str], launched: Collection[str] = ()) -> list[str]:
    """Cancel the tasks still running, then end every child run of the stage still RUNNING: FAILED
    for the child named in `status_of`, KILLED for the rest (a force-cancelled worker cannot end its
    own run). A child a cancelled task claimed and had not marked RUNNING yet, under the stage or
    still under the earlier run it was being taken from (stage.adoptable), is ended again. A child
    another process writes (it took it over, or made it in a stage run it took over: not one of
    the `launched` tasks') is left to it. Returns the ids it ended KILLED; running the stage again
    resumes them from their last.pt."""
    import ray

    cancelled = {ray_task(ref.task_id().hex()) for ref in pending}
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    if pending:
        with contextlib.suppress(Exception):
            ray.wait(pending, num_returns=len(pending), timeout=10)
    ended = []
    try:
        client = tracking.client()
        experiment_id = client.get_run(stage.run_id).info.experiment_id
        children = [run for parent in (stage.run_id, *sorted(stage.adoptable))
                    for run in client.search_runs([experiment_id], max_results=1000,
                                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")]
        for run in children:
            claim = lifecycle.taken_over(run, launched)  # whatever heartbeat its old writer sent after it
            if (claim and lifecycle.writer_alive(claim)) or lifecycle.live_writer(run, launched):
                continue  # another live process's (it claimed it, or made it and beats it): left to it
            if run.info.status == "RUNNING" and run.data.tags.get("mlflow.parentRunId") == stage.run_id:
                status = status_of.get(run.info.run_name, "KILLED")
                tracking.end_run(run.info.run_id, status)
                if status == "KILLED":
                    ended.append(run.info.run_id)
            elif (claim := lifecycle.latest_claim(run)) and claim.get("task") in cancelled and \
                    (run.info.status == "RUNNING" or lifecycle.claimed_since_it_ended(run)):
                # cancelled between its claim and marking it RUNNING (or, under an earlier run, one an
                # earlier command left RUNNING): ended again, so its claim (by a worker gone) is older
                # than its end and the same command takes it over at once
                tracking.end_run(run.info.run_id, "KILLED" if run.info.status == "RUNNING" else run.info.status)
    except Exception as err:  # noqa: BLE001 - the tasks are cancelled; the runs wait for a resume
        log(f"[ray] tasks cancelled, but their runs could not be marked ({type(err).__name__}: "
            f"{first_line(err)}); running the command again resumes them")
    return ended
