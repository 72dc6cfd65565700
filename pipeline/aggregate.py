"""A stage's result from its children: the winner on the selection split, its best.pt and
figures copied up to the stage run (so any stage can be the next one's parent), and plots that
compare the children."""
from __future__ import annotations

import tempfile
from pathlib import Path

from . import checkpoints, plots, tracking
from .errors import CheckpointError
from .runner import RunResult, log


def finish(run_id: str, results: list[RunResult], extra_tags: dict[str, str] | None = None,
           candidates: list[RunResult] | None = None) -> RunResult:
    """Copy the best candidate's best.pt up to the stage run and log its figures, the winner being
    chosen on the selection split (validation, or test as in the seed); compare children."""
    best = holding_weights(candidates or results)
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


def holding_weights(candidates: list[RunResult]) -> RunResult:
    """The best candidate (the first of equals) whose best.pt is still there: a reused child's may
    have been deleted since it finished."""
    for result in sorted(candidates, key=lambda r: -r.best_acc):
        if tracking.has_artifact(result.run_id, checkpoints.BEST):
            return result
        log(f"{result.name} ({result.run_id}) has no {checkpoints.BEST} (deleted?): not chosen")
    raise CheckpointError(f"none of the {len(candidates)} runs this stage chooses from holds "
                          f"{checkpoints.BEST} (deleted?): delete those runs (`mlflow runs delete --run-id ID`) "
                          f"and run the same command, which trains them again")
