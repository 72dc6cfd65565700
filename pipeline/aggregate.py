"""A stage's result from its children: the winner on the selection split, its best.pt and
figures copied up to the stage run (so any stage can be the next one's parent), and plots that
compare the children."""
from __future__ import annotations

import tempfile
from pathlib import Path

from . import checkpoints, plots, tracking
from .errors import CheckpointError
from .runner import RunResult, log


# what trains a stage's children again when none holds a best.pt: reuse finds active runs only
RETRAIN = ("run the same command again, which trains them anew once they are deleted "
           "(`mlflow runs delete --run-id ID` for any that is not)")


def finish(run_id: str, results: list[RunResult], extra_tags: dict[str, str] | None = None,
           candidates: list[RunResult] | None = None, remedy: str = RETRAIN) -> RunResult:
    """Copy the best candidate's best.pt up to the stage run and log its figures, the winner being
    chosen on the selection split (validation, or test as in the seed) among those whose best.pt
    is still there; compare children."""
    best = holding_weights(candidates or results, remedy)
    client = tracking.client()
    checkpoints.save_checkpoint(run_id, checkpoints.BEST, checkpoints.load_weights(best.run_id))
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


def first_holding_weights(ranked: list[tuple[str, str]]) -> str:
    """The first run id of `ranked` (run id, how to name it), best first, that is not deleted and
    whose best.pt is still there (a finished run's may have been deleted since), or "" if none;
    the others are named. A run deleted in the UI keeps its files, but reuse no longer sees it, so
    neither does a choice of weights."""
    for run_id, name in ranked:
        run = tracking.stored_run(run_id)
        if run is None:
            log(f"{name} ({run_id}) {tracking.GONE}")
        elif run.info.lifecycle_stage == "deleted":
            log(f"{name} ({run_id}) was deleted: passed over")
        elif tracking.has_artifact(run_id, checkpoints.BEST):
            return run_id
        else:
            log(f"{name} ({run_id}) has no {checkpoints.BEST} (deleted?): passed over")
    return ""


def holding_weights(candidates: list[RunResult], remedy: str) -> RunResult:
    """The best candidate (the first of equals) that is not deleted and whose best.pt is still there;
    one whose best epoch diverged only when every other is gone (its accuracy is no figure)."""
    ranked = sorted(candidates, key=lambda r: (r.history.best_diverged(), -r.best_acc))
    run_id = first_holding_weights([(r.run_id, r.name) for r in ranked])
    if not run_id:
        raise CheckpointError(f"none of the runs this stage chooses from ({', '.join(r.run_id for r in ranked)}) "
                              f"is active and holds {checkpoints.BEST} (deleted?): {remedy}")
    return next(r for r in ranked if r.run_id == run_id)
