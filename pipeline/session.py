"""What a command does around a stage: open its top-level run (or reopen one to resume it),
take over the children of earlier runs of the same stage that never finished, hand the stage a
`Stage` (its run, the Runtime resolved once, what it may adopt, where registrations go), and
close the run: FINISHED with its training_key, or KILLED/FAILED with what it registered withdrawn.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import mlflow
import yaml

from . import checkpoints, keys, lifecycle, registry, runner, runtime, tracking
from . import data as data_mod
from .config import READ_ONLY_FOR, Config, check_dataset_overrides, format_value, from_params, registers
from .errors import ConfigError, LineageError
from .lineage import resolve_lineage, stage_arch, tuned_by_parent
from .runner import RunResult, Stage, log
from .runtime import Runtime
from .stages import PHASE2_START, STAGES
from .urls import redacted


def run_name(cfg: Config, lineage) -> str:
    if cfg.stage == "train":  # the arch it trains: with arch empty, its parent's
        return f"train {stage_arch(cfg, lineage)} lr={format(cfg.lr, 'g')}"
    return cfg.stage


def top_level_run() -> tuple[str, bool]:
    """(run id, created here): the run `mlflow run` made for us, or a new one. Either way it
    carries the record: git commit, code version, environment."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        run_id, created = env_run, False
    else:
        experiment_id = mlflow.tracking.fluent._get_experiment_id()
        run_id, created = tracking.client().create_run(experiment_id).info.run_id, True
    tags = tracking.record_tags()
    if not created and "mlflow.source.git.commit" in tracking.client().get_run(run_id).data.tags:
        tags.pop("mlflow.source.git.commit")  # `mlflow run` tagged the commit it ran: keep its word
    tracking.set_tags(run_id, tags)
    return run_id, created


def run(cfg: Config, given: frozenset = frozenset()) -> RunResult:
    """Run `cfg`'s stage; `given`: the parameters the user passed (-P), which no parent overrides."""
    lineage = resolve_lineage(cfg)  # a parent that cannot be used is said first, whatever the data
    cfg, sources = tuned_by_parent(cfg, given)
    resolved = runtime.of(cfg)  # once, for the stage and its children; device=cuda without one: stop here
    data_mod.data_files(cfg)  # missing data: one line, and no run made
    run_id, created = top_level_run()
    client = tracking.client()
    with runner.opened(run_id, end=created):
        client.set_tag(run_id, "mlflow.runName", run_name(cfg, lineage))
        client.set_tag(run_id, "stage", cfg.stage)
        client.set_tag(run_id, "source_run_id", cfg.parent_run_id or "scratch")
        client.set_tag(run_id, "init_from", "scratch" if lineage.init_state is None
                       else f"{cfg.parent_run_id}/{checkpoints.BEST}")
        tracking.log_config(run_id, cfg, resolved.params(cfg.bs, cfg.data_pipeline))
        if sources:
            tracking.set_tags(run_id, {f"{name}_from": source for name, source in sources.items()})
        dataset = data_mod.load(cfg)
        key, stage_key = keys.training_key(cfg, dataset.digest, resolved), keys.study_key(cfg, dataset.digest, resolved)
        client.set_tag(run_id, tracking.LINEAGE_DIGEST, lineage.data_of(dataset.digest))  # children copy it
        if cfg.stage != "train":  # a train run logs its own inputs; a stage's are its children's
            tracking.log_datasets(run_id, dataset)
        earlier = continue_earlier_runs(cfg, run_id, stage_key) if cfg.stage != "train" else []
        try:
            stage = Stage(run_id, resolved, frozenset(r.info.run_id for r in earlier),
                          code_version=keys.code_version())
            lifecycle.beat(run_id)  # live before it can be found by its key: no one takes it over
            client.set_tag(run_id, lifecycle.STAGE_KEY, stage_key)
            log(f"{cfg.stage}: run {run_id} in {redacted(mlflow.get_tracking_uri())}")

            def on_success() -> None:
                for old in earlier:  # their children now belong to this run
                    client.set_tag(old.info.run_id, lifecycle.CONTINUED_IN, run_id)
                    if old.info.status == "RUNNING":
                        tracking.end_run(old.info.run_id, "KILLED")
                    tracking.supersede_finished(old.info.run_id)  # this run holds the study's result now
                client.set_tag(run_id, "training_key", key)
                runner.finished(run_id)

            result = run_stage_work(cfg, stage, dataset, lineage, on_success)
        except BaseException:
            release(r.info.run_id for r in earlier)
            raise
    log(f"{cfg.stage} done: run {run_id}, best {result.selected_on}_acc "
        f"{format_value(result.best_acc)}%, test {format_value(result.test_acc_at_best)}% at that epoch")
    return result


def run_stage_work(cfg: Config, stage: Stage, dataset, lineage, on_success: Callable[[], None]) -> RunResult:
    """The stage's work in its open run (a new one, or one resumed), with heartbeats while it
    trains, then `on_success`: the tags that let `main` reuse it, set last, since only a stage
    that finished may be found. If either fails, a version the stage registered is withdrawn."""
    # this process writes the stage run, and the earlier runs it continues (claimed: no one else
    # may take them while it runs); Ray workers write their children
    writing = (stage.run_id, *sorted(stage.adoptable))
    lifecycle.beat(*writing)
    try:
        with lifecycle.heartbeat(*writing):
            result = STAGES[cfg.stage](cfg, stage, dataset, lineage)
        on_success()
    except BaseException:
        registry.withdraw(stage.registered)  # a version registered by a run that failed is not left behind
        if registers(cfg.stage):  # and one the store made as register_model failed or a signal landed
            with contextlib.suppress(Exception):  # the error being raised is the one to report
                run = tracking.client().get_run(stage.run_id)
                if lifecycle.taken_over(run) is None:  # else its versions may be its new writer's
                    registry.withdraw_left_by(run)
        raise
    return result


def release(earlier: Iterable[str]) -> None:
    """Earlier runs this command claimed and did not finish continuing: ended again (KILLED if one
    still read RUNNING), so their claim is older than their end and the same command, from any
    machine, continues them at once rather than waiting out a live-looking claim. A run another
    process has claimed since (-P force=true) is its now, and left alone."""
    for run_id in sorted(earlier):
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            run = tracking.client().get_run(run_id)
            if (claim := lifecycle.latest_claim(run)) is not None and lifecycle.is_mine(claim):
                tracking.end_run(run_id, "KILLED" if run.info.status == "RUNNING" else run.info.status)


def continue_earlier_runs(cfg: Config, run_id: str, stage_key: str) -> list:
    """Earlier runs of this stage with the same key that never finished: this run takes over
    their children (reusing the finished, resuming the interrupted) instead of starting over.

    autotune takes over its study's finished runs too: the study (in Optuna's storage) goes on
    across commands (a larger n_trials adds trials), and its trials' children belong to the run
    that holds its result now. A finished run taken over is never reused by `main` again."""
    experiment_id = tracking.client().get_run(run_id).info.experiment_id
    earlier = lifecycle.earlier_stage_runs(experiment_id, stage_key, run_id, finished=cfg.stage == "autotune")
    claimed = []
    try:
        for old in earlier:  # one writer: of two commands continuing the same runs, one goes on
            lifecycle.claim(old, cfg, "continued")
            claimed.append(old.info.run_id)
        for old in earlier:  # this run registers again, if its stage does
            registry.withdraw_left_by(old)
    except BaseException:  # e.g. one of them is live elsewhere: those claimed already are let go
        release(claimed)
        raise
    if earlier:
        log(f"{cfg.stage}: continuing {', '.join(r.info.run_id for r in earlier)} (same parameters, "
            f"parent and data{'; the same study' if cfg.stage == 'autotune' else '; never finished'}): "
            f"finished children are reused, the interrupted one resumed")
    return earlier


def point_holder_at(run_id: str) -> None:
    """`mlflow run` opened a fresh run for this command: point it at the run we continue."""
    holder = os.environ.get("MLFLOW_RUN_ID")
    if holder and holder != run_id:
        tracking.client().set_tag(holder, "resumed_run_id", run_id)
        tracking.client().set_tag(holder, "mlflow.note.content",
                                  f"This command resumed run {run_id}; its metrics are there.")


def check_resume_params(run_id: str, original: Config, cfg: Config, given: frozenset) -> None:
    """A -P given with resume_run_id that differs from the run's own value would be ignored:
    refused, never silently dropped."""
    differing = [name for name in sorted(given - resume_takes(original))
                 if getattr(cfg, name) != getattr(original, name)]
    if differing:
        shown = ", ".join(f"-P {name}={format_value(getattr(cfg, name))} (the run's: "
                          f"{format_value(getattr(original, name))})" for name in differing)
        raise ConfigError(f"run {run_id} resumes with the parameters it started with, not {shown}: drop "
                          f"{'it' if len(differing) == 1 else 'them'}, or start a new run to train with "
                          f"{'it' if len(differing) == 1 else 'them'}")


def resume_stage(previous, cfg: Config, dataset, resolved: Runtime) -> RunResult:
    """Reopen an unfinished stage run and finish it: its finished children are reused, the
    interrupted one resumed from last.pt, the missing ones trained, then it aggregates."""
    run_id = previous.info.run_id
    lineage = resolve_lineage(cfg)
    lifecycle.claim(previous, cfg, "resumed")
    registry.withdraw_left_by(previous)  # the stage registers again as it finishes
    point_holder_at(run_id)
    client = tracking.client()
    client.update_run(run_id, status="RUNNING")
    stage = Stage(run_id, resolved, code_version=keys.code_version())
    with runner.opened(run_id):
        log(f"{cfg.stage}: resuming stage run {run_id} child by child")
        key = keys.training_key(cfg, dataset.digest, resolved)
        result = run_stage_work(cfg, stage, dataset, lineage, lambda: client.set_tag(run_id, "training_key", key))
    log(f"resumed stage run {run_id} FINISHED, best {result.selected_on}_acc {result.best_acc:.3f}%")
    return result


# What a resume takes from its own command: what never changes a result (where the data lies, how
# the run is logged, sped up or where its children run; not where its study is kept) and the
# device and precision as given (the record check compares what they resolve to). Every other -P
# must be what the run started with.
RESUME_TAKES = (frozenset(keys.VOLATILE) - frozenset(keys.TUNING_EXECUTION)) | frozenset(keys.RESOLVED)


def resume_takes(original: Config) -> frozenset[str]:
    """RESUME_TAKES less what changes this run's result after all (keys.changes_the_result)."""
    return RESUME_TAKES - keys.changes_the_result(original)


def resume(cfg: Config, given: frozenset = frozenset()) -> RunResult | None:
    """Reopen run `cfg.resume_run_id` and continue it: a training run from its last completed
    epoch, a stage run child by child (finished children kept, the interrupted one resumed).
    Only with the parameters (`given`: those passed with -P), data, code, device type and precision
    it started with, and only by one process: nothing is written before those checks pass."""
    run_id = cfg.resume_run_id
    previous = tracking.get_run(run_id, "resume")
    if previous.info.lifecycle_stage == "deleted":  # hidden from the UI and main's reuse; `mlflow gc` may purge it
        raise LineageError(f"run {run_id} was deleted: restore it (`mlflow runs restore --run-id {run_id}`) "
                           f"to resume it, or run the stage again")
    if previous.info.status == "FINISHED":
        log(f"run {run_id} is FINISHED: nothing to resume")
        return None
    lifecycle.refuse_if_live(previous, cfg, "resumed")
    if lifecycle.CONTINUED_IN in previous.data.tags:
        raise LineageError(
            f"run {run_id} was continued in run {previous.data.tags[lifecycle.CONTINUED_IN]}, which holds "
            f"its children now: resume that run instead (-P resume_run_id=...), or run the stage again")
    if previous.data.tags.get("stage") == "main":  # its stages are runs of their own, with their own last.pt
        raise LineageError(f"run {run_id} is a main run, which holds no training of its own: run main again with "
                           f"the same -P (it reuses the stages that finished and continues the one that stopped)")
    if not tracking.has_artifact(run_id, "config.yaml"):  # not a run of this pipeline's training
        raise LineageError(f"run {run_id} has no config.yaml: it was not started by a training stage of this "
                           f"pipeline (a predict, evaluate or `mlflow run` launcher run?), or was stopped before "
                           f"logging it; resume a stage or train run, or run the stage again")
    text = mlflow.artifacts.load_text(f"{previous.info.artifact_uri}/config.yaml")
    original = from_params(yaml.safe_load(text))  # the run's own config, not this command's
    check_resume_params(run_id, original, cfg, given)
    # a data -P the run's own dataset never reads (download=true to a synthetic run) is refused, as
    # config.load refuses it for a new run
    check_dataset_overrides({"dataset": original.dataset}, {name: format_value(getattr(cfg, name)) for name in given
                                                            if name in READ_ONLY_FOR})
    taken = {name: getattr(cfg, name) for name in given & resume_takes(original) if name != "resume_run_id"}
    original = original.replace(**{"force": cfg.force, **taken})
    stage_name = previous.data.tags.get("stage", original.stage)
    stage_run = "mlflow.parentRunId" not in previous.data.tags and stage_name not in ("train", "main")
    arch = previous.data.tags.get("arch") or original.arch or "resnet"
    state = None if stage_run else checkpoints.resume_state(run_id, arch)  # read as plain data, or refused
    dataset = data_mod.load(original)
    resolved = runtime.of(original)
    lifecycle.check_same_record(previous, dataset.digest, resolved)
    if stage_run:
        return resume_stage(previous, original, dataset, resolved)
    lifecycle.claim(previous, original, "resumed")
    point_holder_at(run_id)
    tracking.client().update_run(run_id, status="RUNNING")
    keep_final = previous.data.tags.get("phase") == "1" and PHASE2_START.get(stage_name) == "last"
    with runner.opened(run_id):
        result = runner.train_in_run(run_id, original, dataset, arch=arch, runtime=resolved, resume=state,
                                     keep_final=keep_final)
        if "mlflow.parentRunId" not in previous.data.tags:  # a stage run: `main` may reuse it now
            tracking.client().set_tag(run_id, "training_key", keys.training_key(original, dataset.digest, resolved))
    runner.finished(run_id)
    log(f"resumed run {run_id} FINISHED, best {result.selected_on}_acc {result.best_acc:.3f}%")
    return result
