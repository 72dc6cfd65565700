"""The seed's experiment, one short function per stage over shared helpers.

Each stage gets a top-level run (the one `mlflow run` made, or a new one). Repeats, sweep points
and phases are nested child runs; the top-level run carries the best child's checkpoint, its
figures (best_test_acc, or best_val_acc with a validation split) and tag best_child_run_id, so any
stage can be the parent of the next. Every choice is made on validation when `val_split > 0`.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml

from . import data as data_mod
from . import executor, lifecycle, models, plots, predict, registry, runner, tracking
from .config import Config, check_lineage, format_value, from_params, parse_value
from .executor import ChildSpec
from .runner import RunResult, log
from .train import resolve_runtime


@dataclass
class Lineage:
    """Where a stage comes from: its parent run (for the record) and its initial weights."""
    parent_run_id: str = ""
    parent_arch: str = ""
    parent_winner: str = ""
    init_state: dict | None = None
    parent_data: str = ""           # the data the parent's weights descend from (its lineage_digest)

    @property
    def source(self) -> str:
        """The run a child's weights come from: the parent when it starts from its weights."""
        return self.parent_run_id if self.init_state is not None else "scratch"

    def data_of(self, digest: str) -> str:
        """The data a stage's weights descend from, on data `digest`: that digest, or "mixed" when
        they grow out of a parent's weights trained on other data (which may hold this run's
        held-out images: registry.incomparable never judges such a model)."""
        return digest if self.init_state is None or self.parent_data == digest else "mixed"


def resolve_lineage(cfg: Config) -> Lineage:
    """Check the parent before any data is read or any training starts."""
    check_lineage(cfg)
    if not cfg.parent_run_id:
        return Lineage()
    run = tracking.check_parent(cfg.parent_run_id)
    tags = run.data.tags
    lineage = Lineage(cfg.parent_run_id, tags.get("arch", ""), tags.get("winner", ""),
                      parent_data=tracking.descends_from(tags))
    if cfg.init in ("parent", "auto"):
        lineage.init_state = tracking.parent_state(cfg.parent_run_id)
        arch = cfg.arch or lineage.parent_arch or models.guess_arch(lineage.init_state) or "resnet"
        models.load_state(models.build(arch), lineage.init_state, arch,
                          f"{cfg.parent_run_id}/{tracking.BEST}")
    return lineage


def stage_arch(cfg: Config, lineage: Lineage) -> str:
    return cfg.arch or lineage.parent_winner or lineage.parent_arch or "resnet"


# -- shared helpers ------------------------------------------------------------------------------

def finish(run_id: str, results: list[RunResult], extra_tags: dict[str, str] | None = None,
           candidates: list[RunResult] | None = None) -> RunResult:
    """Copy the best candidate's best.pt up to the stage run and log its figures, the winner being
    chosen on the selection split (validation, or test as in the seed); compare children."""
    best = max(candidates or results, key=lambda r: r.best_acc)
    client = tracking.client()
    tracking.save_checkpoint(run_id, tracking.BEST, tracking.load_weights(best.run_id))
    tracking.log_epoch(run_id, 0, {**best.metrics(),
                                   "total_time_s": sum(r.history.total_time_s for r in results)})
    client.set_tag(run_id, "best_child_run_id", best.run_id)
    client.set_tag(run_id, "arch", best.arch)
    client.set_tag(run_id, "selected_on", best.selected_on)
    for key, value in (extra_tags or {}).items():
        client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        curves = {r.name: r.history.column("test_acc") for r in results}
        client.log_artifact(run_id, str(plots.comparison(curves, Path(tmp) / "compare_test_acc.png")),
                            "plots")
        if best.selected_on == "val":
            curves = {r.name: r.history.column("val_acc") for r in results}
            client.log_artifact(run_id, str(plots.comparison(curves, Path(tmp) / "compare_val_acc.png",
                                                             "val_acc")), "plots")
        curves = {r.name: r.history.column("test_loss") for r in results}
        client.log_artifact(run_id, str(plots.comparison(curves, Path(tmp) / "compare_test_loss.png",
                                                         "test_loss")), "plots")
    log(f"best of {len(candidates or results)}: {best.name} ({best.run_id}) "
        f"{best.selected_on}_acc {best.best_acc:.3f}% (test {best.test_acc_at_best:.3f}% at that epoch)")
    return best


def sweep(cfg: Config, run_id: str, points: list[tuple], dataset, arch: str,
          lineage: Lineage) -> list[RunResult]:
    """Train each (name, config) point as a child run from the stage's initial weights, on the
    configured executor (in this process, or as Ray tasks)."""
    specs = [ChildSpec(name, point, point.arch or arch, lineage.init_state,
                       {"source_run_id": lineage.source}, lineage.source) for name, point in points]
    return executor.run_children(cfg, run_id, specs, dataset)


def number(value: float) -> str:
    return format(value, "g")


# -- the stages ------------------------------------------------------------------------------------

def train(cfg, run_id, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    return runner.train_in_run(run_id, cfg, dataset, arch=arch, init_state=lineage.init_state)


def model_selection(cfg, run_id, dataset, lineage):
    archs = cfg.archs or ["resnet", "vgg"]
    repeats = cfg.capped_repeats(cfg.repeats)
    points = {arch: [(f"model_selection {arch} #{r + 1}", cfg.replace(arch=arch, seed=cfg.seed + r))
                     for r in range(repeats)] for arch in archs}
    # one sweep over every arch, so an executor can run all of them at once
    flat = sweep(cfg, run_id, [p for pts in points.values() for p in pts], dataset, "", Lineage())
    results = {arch: [r for r in flat if r.arch == arch] for arch in archs}
    client = tracking.client()
    summary = {}
    split = cfg.selects_on
    for arch, runs in results.items():
        accs = [r.best_acc for r in runs]
        summary[arch] = {
            f"{arch}_mean_time_s": statistics.fmean(r.history.total_time_s for r in runs),
            f"{arch}_acc_mean": statistics.fmean(accs),
            f"{arch}_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            f"{arch}_params": models.count_parameters(models.build(arch)),
        }
        tracking.log_epoch(run_id, 0, summary[arch])
        log(f"{arch}: best {split}_acc {summary[arch][f'{arch}_acc_mean']:.3f}% "
            f"± {summary[arch][f'{arch}_acc_std']:.3f} over {len(runs)} runs, "
            f"{summary[arch][f'{arch}_mean_time_s']:.1f}s per run")
    winner = max(archs, key=lambda a: summary[a][f"{a}_acc_mean"])
    client.set_tag(run_id, "winner", winner)
    client.set_tag(run_id, "winner_selected_on", split)
    log(f"winner: {winner} (highest mean best {split} accuracy)")
    everything = [r for runs in results.values() for r in runs]
    return finish(run_id, everything, {"winner": winner}, candidates=results[winner])


def baseline(cfg, run_id, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = []
    if cfg.probe_epochs:  # the seed's test0: a shorter look before the long runs
        probe = cfg.replace(arch=arch, tol=cfg.probe_tol, epochs=cfg.probe_epochs)
        points.append((f"baseline test0 ({probe.epochs} epochs)", probe))
    for r in range(cfg.capped_repeats(cfg.repeats)):
        points.append((f"baseline test{r + 1}", cfg.replace(arch=arch, seed=cfg.seed + r)))
    return finish(run_id, sweep(cfg, run_id, points, dataset, arch, lineage))


def tune_lr(cfg, run_id, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = [(f"tune_lr lr={number(lr)}", cfg.replace(arch=arch, lr=lr)) for lr in cfg.lrs or [cfg.lr]]
    return finish(run_id, sweep(cfg, run_id, points, dataset, arch, lineage))


def tune_gamma(cfg, run_id, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = [(f"tune_gamma gamma={number(g)}", cfg.replace(arch=arch, gamma=g))
              for g in cfg.gammas or [cfg.gamma]]
    return finish(run_id, sweep(cfg, run_id, points, dataset, arch, lineage))


def overfit(cfg, run_id, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = [(f"overfit wd={number(wd)} bs={bs}", cfg.replace(arch=arch, wd=wd, bs=bs))
              for wd in cfg.wds or [cfg.wd] for bs in cfg.bss or [cfg.bs]]
    return finish(run_id, sweep(cfg, run_id, points, dataset, arch, lineage))


# What phase 2 continues from, as in the seed: retrain reloads phase 1's best checkpoint
# (`net.load_state_dict(torch.load("myResNet_test0_1.pt"))`); deepen trains the same `net2` on,
# i.e. from phase 1's weights after its last epoch.
PHASE2_START = {"retrain": "best", "deepen": "last"}


def two_phases(cfg, run_id, dataset, lineage, arch: str) -> RunResult:
    """Phase 1 from the stage's initial weights at phase1_* settings, then phase 2 at the stage's
    own settings from phase 1's best or last weights (PHASE2_START). The stage's result is phase
    2's best, as the seed reports it (96.608% / 96.716%), not the best over both phases."""
    first = cfg.replace(arch=arch, lr=cfg.phase1_lr, bs=cfg.phase1_bs, gamma=cfg.phase1_gamma,
                        wd=cfg.phase1_wd, tol=cfg.phase1_tol, epochs=cfg.phase1_epochs or cfg.epochs)
    results = []
    if cfg.phase1_epochs:
        results += executor.run_children(cfg, run_id, [ChildSpec(
            f"{cfg.stage} phase1 lr={number(first.lr)}", first, arch, lineage.init_state,
            {"source_run_id": lineage.source, "phase": "1"}, lineage.source,
            keep_final=PHASE2_START.get(cfg.stage) == "last")], dataset)
    start, source, init_from = lineage.init_state, lineage.parent_run_id or "scratch", ""
    if results:
        if PHASE2_START.get(cfg.stage, "best") == "last":
            start, init_from = results[0].final_state, f"{results[0].run_id}/last epoch"
        else:
            start, init_from = tracking.load_weights(results[0].run_id), f"{results[0].run_id}/{tracking.BEST}"
        source = results[0].run_id
    results += executor.run_children(cfg, run_id, [ChildSpec(
        f"{cfg.stage} phase2 lr={number(cfg.lr)}", cfg.replace(arch=arch), arch, start,
        {"source_run_id": source, "phase": "2", **({"init_from": init_from} if init_from else {})},
        init_from or source)], dataset)
    best = finish(run_id, results, candidates=results[-1:])
    if cfg.register:
        # which digits are hard: confusion matrix, per-digit accuracy, gallery of mistakes
        predict.evaluation_report(registry.classifier_from_run(run_id, best.arch),
                                  dataset.test_images, dataset.test_labels, run_id)
        registry.register(run_id, cfg, best, dataset)  # last: nothing of the run is left to fail
    return best


def autotune(cfg, run_id, dataset, lineage):
    from . import autotune as tuner  # Optuna is imported by this stage only

    return tuner.run(cfg, run_id, dataset, lineage)


def retrain(cfg, run_id, dataset, lineage):
    return two_phases(cfg, run_id, dataset, lineage, stage_arch(cfg, lineage))


def deepen(cfg, run_id, dataset, lineage):
    return two_phases(cfg, run_id, dataset, lineage, cfg.arch or "resnet2")


STAGES = {"train": train, "model_selection": model_selection, "baseline": baseline,
          "tune_lr": tune_lr, "tune_gamma": tune_gamma, "overfit": overfit, "autotune": autotune,
          "retrain": retrain, "deepen": deepen}

TUNED = ("lr", "gamma", "wd", "bs")  # what an autotune run hands on (its tags best_lr, ...)


def tuned_by_parent(cfg: Config, given: frozenset = frozenset()) -> tuple[Config, dict[str, str]]:
    """retrain's phase-2 lr, gamma, wd and bs come from its parent's best values when the parent
    is an autotune run (a value given with -P wins). Returns the config retrain trains and logs
    with, and where each value came from; resolved before anything is logged, so the run's params
    are the values it used."""
    if cfg.stage != "retrain" or not cfg.parent_run_id:
        return cfg, {}
    parent = tracking.get_run(cfg.parent_run_id)
    if parent.data.tags.get("stage") != "autotune":
        return cfg, {}
    changes, sources = {}, {}
    for name in TUNED:
        if name in given:
            sources[name] = "-P"
            continue
        raw = parent.data.tags.get(f"best_{name}")
        if raw is None:
            raise tracking.LineageError(
                f"parent autotune run {cfg.parent_run_id} has no tag best_{name}: it never finished its "
                f"study; run autotune again, or pass -P {name}=<value>")
        changes[name] = parse_value(name, raw)
        sources[name] = f"autotune:{cfg.parent_run_id}"
    return cfg.replace(**changes), sources


# -- the top-level run ------------------------------------------------------------------------------

def run_name(cfg: Config) -> str:
    if cfg.stage == "train":
        return f"train {cfg.arch or 'resnet'} lr={number(cfg.lr)}"
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
    lineage = resolve_lineage(cfg)
    cfg, sources = tuned_by_parent(cfg, given)
    device, precision = resolve_runtime(cfg.device, cfg.precision)  # device=cuda without one: stop here
    run_id, created = top_level_run()
    client = tracking.client()
    with runner.opened(run_id, end=created):
        client.set_tag(run_id, "mlflow.runName", run_name(cfg))
        client.set_tag(run_id, "stage", cfg.stage)
        client.set_tag(run_id, "source_run_id", cfg.parent_run_id or "scratch")
        client.set_tag(run_id, "init_from", "scratch" if lineage.init_state is None
                       else f"{cfg.parent_run_id}/{tracking.BEST}")
        tracking.log_config(run_id, cfg, tracking.runtime_params(device, precision, cfg))
        if sources:
            tracking.set_tags(run_id, {f"{name}_from": source for name, source in sources.items()})
        dataset = data_mod.load(cfg)
        key, stage_key = cfg.training_key(dataset.digest), cfg.study_key(dataset.digest)
        client.set_tag(run_id, tracking.LINEAGE_DIGEST, lineage.data_of(dataset.digest))  # children copy it
        earlier = []
        if cfg.stage != "train":  # a train run logs its own inputs; a stage's are its children's
            tracking.log_datasets(run_id, dataset)
            earlier = continue_earlier_runs(cfg, run_id, stage_key)
        client.set_tag(run_id, lifecycle.STAGE_KEY, stage_key)
        lifecycle.beat(run_id)
        log(f"{cfg.stage}: run {run_id} in {mlflow.get_tracking_uri()}")
        try:
            with lifecycle.heartbeat(run_id):  # this process writes the stage run, Ray workers their children
                result = STAGES[cfg.stage](cfg, run_id, dataset, lineage)
            for old in earlier:  # their children now belong to this run
                client.set_tag(old.info.run_id, lifecycle.CONTINUED_IN, run_id)
                if old.info.status == "RUNNING":
                    tracking.end_run(old.info.run_id, "KILLED")
            # set last: only a stage that finished can be found and reused by `main`
            client.set_tag(run_id, "training_key", key)
            runner.finished(run_id)
        except BaseException:
            registry.withdraw()  # a version registered by a run that failed is not left behind
            raise
    log(f"{cfg.stage} done: run {run_id}, best {result.selected_on}_acc "
        f"{format_value(result.best_acc)}%, test {format_value(result.test_acc_at_best)}% at that epoch")
    return result


def continue_earlier_runs(cfg: Config, run_id: str, stage_key: str) -> list:
    """Earlier runs of this stage with the same key that never finished: this run takes over
    their children (reusing the finished, resuming the interrupted) instead of starting over.

    autotune takes over its study's finished runs too: the study (in Optuna's storage) goes on
    across commands (a larger n_trials adds trials), and its trials' children belong to the run
    that holds its result now. A finished run taken over is never reused by `main` again."""
    experiment_id = tracking.client().get_run(run_id).info.experiment_id
    earlier = lifecycle.earlier_stage_runs(experiment_id, stage_key, run_id, finished=cfg.stage == "autotune")
    for old in earlier:  # one writer: of two commands continuing the same runs, one goes on
        lifecycle.claim(old, cfg, "continued")
    for old in earlier:
        if old.info.status == "FINISHED":  # its children move here: its result is not one to reuse
            tracking.client().set_tag(old.info.run_id, "training_key",
                                      f"superseded-{old.data.tags.get('training_key', '')}")
    lifecycle.ADOPTABLE.update(r.info.run_id for r in earlier)
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


def resume_stage(previous, cfg: Config, dataset) -> RunResult:
    """Reopen an unfinished stage run and finish it: its finished children are reused, the
    interrupted one resumed from last.pt, the missing ones trained, then it aggregates."""
    run_id = previous.info.run_id
    lineage = resolve_lineage(cfg)
    lifecycle.claim(previous, cfg, "resumed")
    point_holder_at(run_id)
    client = tracking.client()
    client.update_run(run_id, status="RUNNING")
    with runner.opened(run_id):
        lifecycle.beat(run_id)
        log(f"{cfg.stage}: resuming stage run {run_id} child by child")
        try:
            with lifecycle.heartbeat(run_id):
                result = STAGES[cfg.stage](cfg, run_id, dataset, lineage)
            client.set_tag(run_id, "training_key", cfg.training_key(dataset.digest))
        except BaseException:
            registry.withdraw()
            raise
    log(f"resumed stage run {run_id} FINISHED, best {result.selected_on}_acc {result.best_acc:.3f}%")
    return result


def resume(cfg: Config) -> RunResult | None:
    """Reopen run `cfg.resume_run_id` and continue it: a training run from its last completed
    epoch, a stage run child by child (finished children kept, the interrupted one resumed).
    Only with the data, code, device type and precision it started with, and only by one process:
    nothing is written before those checks pass."""
    run_id = cfg.resume_run_id
    previous = tracking.get_run(run_id, "resume")
    if previous.info.status == "FINISHED":
        log(f"run {run_id} is FINISHED: nothing to resume")
        return None
    lifecycle.refuse_if_live(previous, cfg, "resumed")
    if lifecycle.CONTINUED_IN in previous.data.tags:
        raise tracking.LineageError(
            f"run {run_id} was continued in run {previous.data.tags[lifecycle.CONTINUED_IN]}, which holds "
            f"its children now: resume that run instead (-P resume_run_id=...), or run the stage again")
    text = mlflow.artifacts.load_text(f"{previous.info.artifact_uri}/config.yaml")
    original = from_params(yaml.safe_load(text))  # the run's own config, not this command's
    original.force = cfg.force
    stage = previous.data.tags.get("stage", original.stage)
    stage_run = "mlflow.parentRunId" not in previous.data.tags and stage not in ("train", "main")
    arch = previous.data.tags.get("arch") or original.arch or "resnet"
    state = None if stage_run else runner.resume_state(run_id, arch)  # read as plain data, or refused
    dataset = data_mod.load(original)
    device, precision = resolve_runtime(original.device, original.precision)
    lifecycle.check_same_record(previous, dataset.digest, device.type, precision)
    if stage_run:
        return resume_stage(previous, original, dataset)
    lifecycle.claim(previous, original, "resumed")
    point_holder_at(run_id)
    tracking.client().update_run(run_id, status="RUNNING")
    keep_final = previous.data.tags.get("phase") == "1" and PHASE2_START.get(stage) == "last"
    with runner.opened(run_id):
        result = runner.train_in_run(run_id, original, dataset, arch=arch, resume=state,
                                     keep_final=keep_final)
        if "mlflow.parentRunId" not in previous.data.tags:  # a stage run: `main` may reuse it now
            tracking.client().set_tag(run_id, "training_key", original.training_key(dataset.digest))
    runner.finished(run_id)
    log(f"resumed run {run_id} FINISHED, best {result.selected_on}_acc {result.best_acc:.3f}%")
    return result
