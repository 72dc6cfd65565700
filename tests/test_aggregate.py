"""aggregate.finish in a real local store: the stage takes the best candidate that still holds its
best.pt (a reused child's may have been deleted), and says so in one line when none does."""
import pytest
import torch

from pipeline import aggregate, checkpoints, runner, tracking, train
from pipeline.errors import CheckpointError, LineageError


def child(store, stage_id: str, name: str, acc: float, fill: float) -> runner.RunResult:
    """A FINISHED child whose best.pt is one tensor of `fill`, its history one epoch at `acc`."""
    run_id = store.client.create_run("0", run_name=name, tags={"mlflow.parentRunId": stage_id}).info.run_id
    checkpoints.save_checkpoint(run_id, checkpoints.BEST, {"w": torch.full((2,), fill)})
    history = train.History()
    history.add(train.EpochResult(1, 1.0, 1.0, acc, acc, 1.0, 100.0))
    store.client.set_terminated(run_id)
    return runner.RunResult(run_id, name, "resnet", acc, 1, history, "test", acc)


@pytest.fixture
def stage(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    return store, store.client.create_run("0", run_name="tune_lr").info.run_id


def test_the_best_child_without_its_best_pt_is_passed_over_for_the_next(stage, capsys):
    store, stage_id = stage
    best, second, third = (child(store, stage_id, f"lr={i}", acc, fill)
                           for i, (acc, fill) in enumerate([(60.0, 1.0), (50.0, 2.0), (40.0, 3.0)]))
    tracking.delete_artifact(best.run_id, checkpoints.BEST)
    chosen = aggregate.finish(stage_id, [third, best, second])  # in no order: ranked by accuracy
    assert chosen is second
    assert store.client.get_run(stage_id).data.tags["best_child_run_id"] == second.run_id
    assert torch.equal(checkpoints.load_weights(stage_id)["w"], torch.full((2,), 2.0))  # its weights
    assert f"lr=0 ({best.run_id}) has no checkpoints/best.pt (deleted?): passed over" in capsys.readouterr().out


def test_the_most_accurate_child_wins_wherever_it_is_listed_and_the_first_of_equals_on_a_tie(stage):
    store, stage_id = stage
    low, high, tie_a, tie_b = (child(store, stage_id, name, acc, fill) for name, acc, fill in
                               [("low", 40.0, 1.0), ("high", 60.0, 2.0), ("a", 50.0, 3.0), ("b", 50.0, 4.0)])
    assert aggregate.finish(stage_id, [low, tie_a, high]) is high
    assert torch.equal(checkpoints.load_weights(stage_id)["w"], torch.full((2,), 2.0))
    assert aggregate.holding_weights([low, tie_b, tie_a], "") is tie_b
    assert aggregate.holding_weights([low, tie_a, tie_b], "") is tie_a


def test_a_deleted_run_is_passed_over_though_it_keeps_its_best_pt(stage, capsys):
    store, stage_id = stage
    best, second = (child(store, stage_id, f"lr={i}", acc, fill) for i, (acc, fill) in enumerate([(60.0, 1.0), (50.0, 2.0)]))
    store.client.delete_run(best.run_id)  # as the UI's delete does: its files stay
    assert tracking.has_artifact(best.run_id, checkpoints.BEST)
    assert aggregate.first_holding_weights([(best.run_id, "lr=0"), (second.run_id, "lr=1")]) == second.run_id
    assert f"lr=0 ({best.run_id}) was deleted: passed over" in capsys.readouterr().out
    assert aggregate.finish(stage_id, [best, second]) is second
    assert torch.equal(checkpoints.load_weights(stage_id)["w"], torch.full((2,), 2.0))


def test_no_candidate_with_a_best_pt_is_refused_in_one_line_and_the_stage_gets_none(stage):
    store, stage_id = stage
    only = child(store, stage_id, "lr=0", 60.0, 1.0)
    tracking.delete_artifact(only.run_id, checkpoints.BEST)
    with pytest.raises(CheckpointError) as refused:
        aggregate.finish(stage_id, [only])
    assert str(refused.value) == (f"none of the runs this stage chooses from ({only.run_id}) is active and holds "
                                  f"checkpoints/best.pt (deleted?): {aggregate.RETRAIN}")
    assert not tracking.has_artifact(stage_id, checkpoints.BEST)


def test_a_child_whose_best_epoch_diverged_is_chosen_only_when_no_other_is_left(stage):
    """Its accuracy is digit 0's share (NaN logits argmax to 0), which may beat a child near chance."""
    store, stage_id = stage
    diverged, finite = child(store, stage_id, "lr=10", 19.0, float("nan")), child(store, stage_id, "lr=0.1", 10.0, 2.0)
    diverged.history.diverged = True
    assert aggregate.finish(stage_id, [diverged, finite]) is finite
    assert torch.equal(checkpoints.load_weights(stage_id)["w"], torch.full((2,), 2.0))
    tracking.delete_artifact(finite.run_id, checkpoints.BEST)
    assert aggregate.finish(stage_id, [diverged, finite]) is diverged  # registration keeps it off the alias


def test_a_parent_whose_best_pt_is_not_finite_is_refused_in_one_line(stage):
    store, stage_id = stage
    nan = child(store, stage_id, "lr=10", 19.0, float("nan"))
    with pytest.raises(LineageError, match=r"parent run \w+'s checkpoints/best.pt holds weights that are not finite"):
        checkpoints.parent_state(nan.run_id)
    finite = child(store, stage_id, "lr=0.1", 10.0, 2.0)
    assert torch.equal(checkpoints.parent_state(finite.run_id)["w"], torch.full((2,), 2.0))


def test_a_checkpoint_that_is_gone_is_named_in_one_line(stage):
    store, stage_id = stage
    gone = child(store, stage_id, "lr=0", 60.0, 1.0)
    tracking.delete_artifact(gone.run_id, checkpoints.BEST)
    with pytest.raises(CheckpointError) as refused:
        checkpoints.load_weights(gone.run_id)
    assert str(refused.value) == (f"run {gone.run_id}: checkpoints/best.pt is gone (deleted?): use another run, "
                                  f"or train this one again")


def test_a_finished_run_drops_the_half_written_checkpoints_a_killed_attempt_left(stage):
    store, stage_id = stage
    done = child(store, stage_id, "lr=0", 60.0, 1.0)
    folder = tracking.local_artifact_dir(done.run_id) / "checkpoints"
    (folder / ".last.pt.4242.tmp").write_bytes(b"half")  # its writer was SIGKILLed mid-write
    checkpoints.save_checkpoint(done.run_id, checkpoints.LAST, {"w": torch.ones(1)})
    runner.finished(done.run_id)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt"]
