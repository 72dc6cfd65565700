"""The seed's experiment, one short function per stage over shared helpers.

Each stage gets a top-level run (the one `mlflow run` made, or a new one). Repeats, sweep points
and phases are nested child runs; the top-level run carries the best child's checkpoint, its
figures (best_test_acc, or best_val_acc with a validation split) and tag best_child_run_id, so any
stage can be the parent of the next. Every choice is made on validation when `val_split > 0`.
"""
from __future__ import annotations

import statistics

from . import checkpoints, executor, models, pause, predict, registry, runner, tracking
from .aggregate import finish
from .config import Config
from .errors import LineageError
from .executor import ChildSpec
from .lineage import Lineage, stage_arch
from .runner import RunResult, Stage, log


# -- shared helpers ------------------------------------------------------------------------------

def sweep(cfg: Config, stage: Stage, points: list[tuple], dataset, arch: str,
          lineage: Lineage) -> list[RunResult]:
    """Train each (name, config) point as a child run from the stage's initial weights, on the
    configured executor (in this process, or as Ray tasks)."""
    specs = [ChildSpec(name, point, point.arch or arch, lineage.init_state,
                       {"source_run_id": lineage.source}, lineage.source) for name, point in points]
    return executor.run_children(cfg, stage, specs, dataset)


def number(value: float) -> str:
    return format(value, "g")


# -- the stages ------------------------------------------------------------------------------------

def train(cfg, stage, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    return runner.train_in_run(stage.run_id, cfg, dataset, arch=arch, runtime=stage.runtime,
                               init_state=lineage.init_state)


def model_selection(cfg, stage, dataset, lineage):
    archs = cfg.archs or ["resnet", "vgg"]
    repeats = cfg.capped_repeats(cfg.repeats)
    points = {arch: [(f"model_selection {arch} #{r + 1}", cfg.replace(arch=arch, seed=cfg.seed + r))
                     for r in range(repeats)] for arch in archs}
    # one sweep over every arch, so an executor can run all of them at once
    flat = sweep(cfg, stage, [p for pts in points.values() for p in pts], dataset, "", Lineage())
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
        tracking.log_epoch(stage.run_id, 0, summary[arch])
        log(f"{arch}: best {split}_acc {summary[arch][f'{arch}_acc_mean']:.3f}% "
            f"± {summary[arch][f'{arch}_acc_std']:.3f} over {len(runs)} runs, "
            f"{summary[arch][f'{arch}_mean_time_s']:.1f}s per run")
    winner = max(archs, key=lambda a: summary[a][f"{a}_acc_mean"])
    client.set_tag(stage.run_id, "winner", winner)
    client.set_tag(stage.run_id, "winner_selected_on", split)
    log(f"winner: {winner} (highest mean best {split} accuracy)")
    everything = [r for runs in results.values() for r in runs]
    return finish(stage.run_id, everything, {"winner": winner}, candidates=results[winner])


def baseline(cfg, stage, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = []
    if cfg.probe_epochs:  # the seed's test0: a shorter look before the long runs
        probe = cfg.replace(arch=arch, tol=cfg.probe_tol, epochs=cfg.probe_epochs)
        points.append((f"baseline test0 ({probe.epochs} epochs)", probe))
    for r in range(cfg.capped_repeats(cfg.repeats)):
        points.append((f"baseline test{r + 1}", cfg.replace(arch=arch, seed=cfg.seed + r)))
    return finish(stage.run_id, sweep(cfg, stage, points, dataset, arch, lineage))


def tune_lr(cfg, stage, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = [(f"tune_lr lr={number(lr)}", cfg.replace(arch=arch, lr=lr)) for lr in cfg.lrs or [cfg.lr]]
    return finish(stage.run_id, sweep(cfg, stage, points, dataset, arch, lineage))


def tune_gamma(cfg, stage, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = [(f"tune_gamma gamma={number(g)}", cfg.replace(arch=arch, gamma=g))
              for g in cfg.gammas or [cfg.gamma]]
    return finish(stage.run_id, sweep(cfg, stage, points, dataset, arch, lineage))


def overfit(cfg, stage, dataset, lineage):
    arch = stage_arch(cfg, lineage)
    points = [(f"overfit wd={number(wd)} bs={bs}", cfg.replace(arch=arch, wd=wd, bs=bs))
              for wd in cfg.wds or [cfg.wd] for bs in cfg.bss or [cfg.bs]]
    return finish(stage.run_id, sweep(cfg, stage, points, dataset, arch, lineage))


# What phase 2 continues from, as in the seed: retrain reloads phase 1's best checkpoint
# (`net.load_state_dict(torch.load("myResNet_test0_1.pt"))`); deepen trains the same `net2` on,
# i.e. from phase 1's weights after its last epoch.
PHASE2_START = {"retrain": "best", "deepen": "last"}


def two_phases(cfg, stage, dataset, lineage, arch: str) -> RunResult:
    """Phase 1 from the stage's initial weights at phase1_* settings, then phase 2 at the stage's
    own settings from phase 1's best or last weights (PHASE2_START). The stage's result is phase
    2's best, as the seed reports it (96.608% / 96.716%), not the best over both phases."""
    first = cfg.replace(arch=arch, lr=cfg.phase1_lr, bs=cfg.phase1_bs, gamma=cfg.phase1_gamma,
                        wd=cfg.phase1_wd, tol=cfg.phase1_tol, epochs=cfg.phase1_epochs or cfg.epochs)
    from_last = PHASE2_START.get(cfg.stage) == "last"
    results = []
    if cfg.phase1_epochs:
        results += executor.run_children(cfg, stage, [ChildSpec(
            f"{cfg.stage} phase1 lr={number(first.lr)}", first, arch, lineage.init_state,
            {"source_run_id": lineage.source, "phase": "1"}, lineage.source,
            keep_final=from_last)], dataset)
    start, source, init_from = lineage.init_state, lineage.source, ""
    if results:
        phase1 = results[0].history
        if phase1.best_diverged() or (phase1.diverged and from_last):
            raise LineageError(f"{cfg.stage}: phase 1 (run {results[0].run_id}) diverged at epoch "
                               f"{phase1.epochs[-1].epoch} (its loss is not finite), so phase 2 has no "
                               f"weights to start from: lower phase1_lr (now {first.lr:g}) and run it again")
        if from_last:
            start, init_from = results[0].final_state, f"{results[0].run_id}/last epoch"
        else:
            start, init_from = checkpoints.load_weights(results[0].run_id), f"{results[0].run_id}/{checkpoints.BEST}"
        source = results[0].run_id
    results += executor.run_children(cfg, stage, [ChildSpec(
        f"{cfg.stage} phase2 lr={number(cfg.lr)}", cfg.replace(arch=arch), arch, start,
        {"source_run_id": source, "phase": "2", **({"init_from": init_from} if init_from else {})},
        init_from or source)], dataset)
    best = finish(stage.run_id, results, candidates=results[-1:])
    if cfg.register:
        # which digits are hard: confusion matrix, per-digit accuracy, gallery of mistakes
        predict.evaluation_report(registry.classifier_from_run(stage.run_id, best.arch),
                                  dataset.test_images, dataset.test_labels, stage.run_id, skip_if_diverged=True)
        # last: nothing of the run is left to fail; the session withdraws it if the stage fails after
        registry.register(stage.run_id, cfg, best, dataset, stage.registered)
        pause.point("registered", cfg.stage, stage.run_id)
    return best


def autotune(cfg, stage, dataset, lineage):
    from . import autotune as tuner  # Optuna is imported by this stage only

    return tuner.run(cfg, stage, dataset, lineage)


def retrain(cfg, stage, dataset, lineage):
    return two_phases(cfg, stage, dataset, lineage, stage_arch(cfg, lineage))


def deepen(cfg, stage, dataset, lineage):
    return two_phases(cfg, stage, dataset, lineage, cfg.arch or "resnet2")


STAGES = {"train": train, "model_selection": model_selection, "baseline": baseline,
          "tune_lr": tune_lr, "tune_gamma": tune_gamma, "overfit": overfit, "autotune": autotune,
          "retrain": retrain, "deepen": deepen}

