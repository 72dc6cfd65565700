"""runner: one tracked training run. How a run ends (opened), which child is trained, reused or
adopted (child_run, by key), and what a Stage hands down; in a real temporary tracking store,
training resnet for one epoch on 64 synthetic images."""
import pytest
import torch

from pipeline import checkpoints, config, data, interrupts, runner, train
from pipeline.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")


@pytest.fixture
def tiny(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    cfg = config.load("train", store.params({"epochs": "1", "limit_train": "64", "limit_test": "32",
                                             "bs": "32", "init": "scratch", "device": "cpu", "precision": "fp32"}))
    return store, cfg, data.load(cfg)


@pytest.mark.parametrize("raised,end,status", [(KeyboardInterrupt("SIGTERM"), False, "KILLED"),
                                               (ValueError("boom"), True, "FAILED"),
                                               (ValueError("boom"), False, "RUNNING"),
                                               (None, True, "FINISHED")])
def test_opened_ends_the_run_as_it_went_and_names_a_killed_run_on_the_interrupt(store, monkeypatch, raised, end,
                                                                              status):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    run_id = store.client.create_run("0").info.run_id
    try:
        with runner.opened(run_id, end=end):
            if raised is not None:
                raise raised
    except BaseException as err:  # noqa: BLE001 - the test re-checks what came out
        assert err is raised
        if isinstance(err, KeyboardInterrupt):
            assert interrupts.killed_runs(err) == [run_id]  # what __main__ names in its hint
    assert store.client.get_run(run_id).info.status == status


def child(stage, cfg, dataset, name="point", tags=(), **hooks):
    return runner.child_run(stage, name, cfg, dataset, arch="resnet", init_state=None,
                            tags={"source_run_id": "scratch", **dict(tags)}, init_source="scratch", **hooks)


def test_a_finished_child_with_the_same_key_is_reused_and_another_name_trains(tiny, capsys):
    store, cfg, dataset = tiny
    stage = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    first = child(stage, cfg, dataset)
    assert store.client.get_run(first.run_id).info.status == "FINISHED"
    assert store.steps(first.run_id, "test_acc") == [1]
    again = child(stage, cfg, dataset)
    assert again.run_id == first.run_id and f"reusing FINISHED child run {first.run_id}" in capsys.readouterr().out
    assert again.best_acc == first.best_acc and again.history.column("test_acc") == first.history.column("test_acc")
    other = child(stage, cfg, dataset, name="another point")
    assert other.run_id != first.run_id
    assert len(store.children(stage.run_id)) == 2


def test_a_finished_child_whose_weights_were_deleted_is_trained_again_not_reused_into_an_error(tiny, capsys):
    from pipeline import tracking

    store, cfg, dataset = tiny
    stage = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    first = child(stage, cfg, dataset, keep_final=True)  # a phase 1: phase 2 starts from its final.pt
    tracking.delete_artifact(first.run_id, checkpoints.FINAL)  # by hand, or a cleanup of the store
    capsys.readouterr()
    again = child(stage, cfg, dataset, keep_final=True)
    assert again.run_id != first.run_id and store.steps(again.run_id, "test_acc") == [1]
    assert torch.equal(again.final_state["fc.weight"], store.checkpoint(again.run_id, checkpoints.FINAL)["fc.weight"])
    assert f"point: FINISHED child run {first.run_id} has lost its weights (deleted?): training it again" \
        in capsys.readouterr().out
    assert store.client.get_run(first.run_id).data.tags["training_key"].startswith("superseded-")
    assert child(stage, cfg, dataset, keep_final=True).run_id == again.run_id  # whole: reused
    tracking.delete_artifact(again.run_id, checkpoints.BEST)
    assert child(stage, cfg, dataset).run_id not in (first.run_id, again.run_id)


def test_a_run_taken_over_by_another_process_stops_before_its_next_record_and_is_left_to_it(tiny):
    """This process looked dead from elsewhere (a partition longer than the stale limit): another
    claimed the run after epoch 1. This one records nothing more of it and leaves its status to
    that writer; the stage run above it is this process's, and ends FAILED as on any error."""
    from pipeline import lifecycle
    from pipeline.errors import TakenOver

    store, cfg, dataset = tiny
    stage_run = store.client.create_run("0").info.run_id
    run_id = store.client.create_run("0").info.run_id
    other = lifecycle.parse_stamp(lifecycle.stamp(pid="999999", start="1", time="1"))

    def another_process_claims(end):
        if end.result.epoch == 1:
            store.client.log_param(run_id, f"{lifecycle.CLAIM}1", lifecycle.stamp(**other))

    pruner_heard = []

    def pruner(end):  # as autotune's: a taken-over trial never reports the epoch it saw the claim at
        pruner_heard.append(end.result.epoch)
        return False

    with pytest.raises(TakenOver, match=f"^run {run_id} was taken over by {other['host']} pid 999999 "):
        with runner.opened(stage_run), runner.opened(run_id):
            runner.train_in_run(run_id, cfg.replace(epochs=3), dataset, arch="resnet", runtime=CPU,
                                stop_hooks=(pruner,), callbacks=(another_process_claims,))
    assert pruner_heard == [1] and store.steps(run_id, "test_acc") == [1]  # epoch 2 trained, never recorded
    assert store.checkpoint(run_id, checkpoints.LAST)["epoch"] == 1
    assert store.client.get_run(run_id).info.status == "RUNNING"
    assert store.client.get_run(stage_run).info.status == "FAILED"


def test_a_stage_run_taken_over_stops_its_child_here_and_is_left_to_its_new_writer(tiny):
    """A stage run this process drives (executor=local), claimed by another after its child's
    epoch 1: the child, this process's own, stops and ends FAILED; the stage run is left as is."""
    from pipeline import lifecycle
    from pipeline.errors import TakenOver

    store, cfg, dataset = tiny
    stage_run, run_id = (store.client.create_run("0").info.run_id for _ in range(2))
    other = lifecycle.stamp(pid="999999", time="1")

    def another_process_claims(*runs):
        def claim(end):
            if end.result.epoch == 1:
                for run in runs:
                    store.client.log_param(run, f"{lifecycle.CLAIM}1", other)
        return claim

    with pytest.raises(TakenOver, match=f"^run {stage_run} was taken over"):
        with runner.opened(stage_run), runner.opened(run_id):
            runner.train_in_run(run_id, cfg.replace(epochs=3), dataset, arch="resnet", runtime=CPU,
                                stage_run_id=stage_run, callbacks=(another_process_claims(stage_run),))
    assert store.steps(run_id, "test_acc") == [1]
    assert store.client.get_run(run_id).info.status == "FAILED"
    assert store.client.get_run(stage_run).info.status == "RUNNING"
    # both taken at once (a resume of the stage run with force=true claims it, then its child): the
    # child's TakenOver passes the stage run, which is not ended either
    stage_run, run_id = (store.client.create_run("0").info.run_id for _ in range(2))
    with pytest.raises(TakenOver, match=f"^run {run_id} was taken over"):
        with runner.opened(stage_run), runner.opened(run_id):
            runner.train_in_run(run_id, cfg.replace(epochs=3), dataset, arch="resnet", runtime=CPU,
                                stage_run_id=stage_run, callbacks=(another_process_claims(stage_run, run_id),))
    assert {store.client.get_run(r).info.status for r in (stage_run, run_id)} == {"RUNNING"}


def test_a_run_this_process_took_over_reads_running_again_once_the_writer_before_ended_it(tiny):
    """The writer it took over from stops at its next epoch, and `mlflow run` (or a Ray driver)
    then ends the run FAILED: at this writer's next epoch the run reads RUNNING again, so it is
    live to everyone else, and it ends FINISHED when this writer is done."""
    from pipeline import lifecycle

    store, cfg, dataset = tiny
    run_id = store.client.create_run("0").info.run_id
    lifecycle.claim(store.client.get_run(run_id), cfg.replace(force=True), "resumed")
    seen = []

    def the_old_writers_launcher_ends_it(end):
        seen.append(store.client.get_run(run_id).info.status)
        if end.result.epoch == 1:
            store.client.set_terminated(run_id, "FAILED")

    with runner.opened(run_id):
        runner.train_in_run(run_id, cfg.replace(epochs=2), dataset, arch="resnet", runtime=CPU,
                            callbacks=(the_old_writers_launcher_ends_it,))
    assert seen == ["RUNNING", "RUNNING"] and store.steps(run_id, "test_acc") == [1, 2]
    assert store.client.get_run(run_id).info.status == "FINISHED"
    # a run nobody claimed (this process made it) and someone else ended is not put back
    unclaimed = store.client.create_run("0").info.run_id
    seen.clear()

    def ended_by_someone(end):
        if end.result.epoch == 1:
            store.client.set_terminated(unclaimed, "KILLED")
        else:
            seen.append(store.client.get_run(unclaimed).info.status)

    runner.train_in_run(unclaimed, cfg.replace(epochs=2), dataset, arch="resnet", runtime=CPU,
                        callbacks=(ended_by_someone,))
    assert seen == ["KILLED"]


def test_only_an_adoptable_earlier_stage_runs_children_are_taken_over(tiny):
    store, cfg, dataset = tiny
    earlier = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    trained = child(earlier, cfg, dataset)
    stranger = runner.Stage(store.client.create_run("0").info.run_id, CPU)  # adopts nothing
    assert child(stranger, cfg, dataset).run_id != trained.run_id
    continuing = runner.Stage(store.client.create_run("0").info.run_id, CPU, frozenset({earlier.run_id}))
    assert child(continuing, cfg, dataset).run_id == trained.run_id
    assert store.client.get_run(trained.run_id).data.tags["mlflow.parentRunId"] == continuing.run_id


def test_a_child_whose_last_pt_cannot_be_resumed_is_trained_again_not_a_dead_end(tiny, tmp_path, capsys):
    store, cfg, dataset = tiny
    stage = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    stopped = child(stage, cfg, dataset)
    store.client.update_run(stopped.run_id, status="KILLED")  # as if killed mid-child...
    (tmp_path / "last.pt").write_bytes(b"damaged on its way to the store")  # ...with a last.pt no loader takes
    store.client.log_artifact(stopped.run_id, str(tmp_path / "last.pt"), "checkpoints")
    capsys.readouterr()
    again = child(stage, cfg, dataset)
    assert again.run_id != stopped.run_id and store.steps(again.run_id, "test_acc") == [1]
    assert f"point: child run {stopped.run_id} cannot be resumed (run {stopped.run_id}: checkpoints/last.pt is not " \
           f"plain data (Unsupported operand 100), so it was refused unread); training it again from its start" \
        in capsys.readouterr().out
    assert store.client.get_run(stopped.run_id).data.tags["training_key"].startswith("superseded-")
    # plain data of the right format, without the model: malformed, refused, the reason whole
    store.client.update_run(again.run_id, status="KILLED")
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "epoch": 1}, tmp_path / "last.pt")
    store.client.log_artifact(again.run_id, str(tmp_path / "last.pt"), "checkpoints")
    capsys.readouterr()
    assert child(stage, cfg, dataset).run_id not in (stopped.run_id, again.run_id)
    assert f"point: child run {again.run_id} cannot be resumed (run {again.run_id}: checkpoints/last.pt is malformed " \
           f"(KeyError: 'model'): it was not written by this pipeline or is damaged); training it again from its " \
           f"start" in capsys.readouterr().out


def test_a_child_pruned_then_resumed_before_it_finished_trains_no_more(tiny, capsys, monkeypatch):
    """A trial's worker dies after its hook pruned the child and before the child's FINISHED: the
    retry resumes it from last.pt, which says it was pruned, so no epoch past the prune trains."""
    store, cfg, dataset = tiny
    cfg = cfg.replace(epochs=3)
    stage = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    loss_plot = runner.plots.loss

    def dies(*args, **kwargs):  # the end of training, after the prune, before FINISHED
        monkeypatch.setattr(runner.plots, "loss", loss_plot)
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(runner.plots, "loss", dies)
    with pytest.raises(KeyboardInterrupt):
        child(stage, cfg, dataset, stop_hooks=(lambda end: end.result.epoch >= 1,))
    (stopped,) = store.children(stage.run_id)
    assert stopped.info.status == "KILLED" and store.steps(stopped.info.run_id, "test_acc") == [1]
    asked = []
    capsys.readouterr()
    again = child(stage, cfg, dataset, stop_hooks=(lambda end: asked.append(end.result.epoch) or False,))
    assert again.run_id == stopped.info.run_id and "where it had been pruned" in capsys.readouterr().out
    assert asked == [] and store.steps(again.run_id, "test_acc") == [1] and len(again.history.epochs) == 1
    assert store.client.get_run(again.run_id).info.status == "FINISHED"
    for total in ("total_time_s", "best_epoch"):  # the killed attempt logged the totals already: once
        assert len(store.client.get_metric_history(again.run_id, total)) == 1, total


def test_a_reused_child_keeps_where_it_trained_and_a_resumed_one_says_where_it_trains_now(tiny, monkeypatch):
    """Tags given for this attempt (executor=ray: the node) describe the run only where it trains."""
    store, cfg, dataset = tiny
    stage = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    first = child(stage, cfg, dataset, tags={"ray_node_id": "node-a"})
    child(stage, cfg, dataset, tags={"ray_node_id": "node-b"})  # reused: trained on node-a
    assert store.client.get_run(first.run_id).data.tags["ray_node_id"] == "node-a"
    loss_plot = runner.plots.loss

    def dies(*args, **kwargs):  # after its epoch and its last.pt, before FINISHED
        monkeypatch.setattr(runner.plots, "loss", loss_plot)
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(runner.plots, "loss", dies)
    with pytest.raises(KeyboardInterrupt):
        child(stage, cfg, dataset, name="another", tags={"ray_node_id": "node-a"})
    (stopped,) = [c for c in store.children(stage.run_id) if c.info.run_id != first.run_id]
    monkeypatch.setattr(runner.plots, "loss", dies)
    with pytest.raises(KeyboardInterrupt):  # a retry elsewhere, stopped too
        child(stage, cfg, dataset, name="another", tags={"ray_node_id": "node-b"})
    assert store.client.get_run(stopped.info.run_id).data.tags["ray_node_id"] == "node-b"
    resumed = child(stage, cfg, dataset, name="another")  # then executor=local: it names no node
    assert resumed.run_id == stopped.info.run_id
    assert "ray_node_id" not in store.client.get_run(resumed.run_id).data.tags


def test_a_child_keyed_on_another_runtime_is_not_reused(tiny):
    store, cfg, dataset = tiny
    stage = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    first = child(stage, cfg, dataset)
    bf16 = runner.Stage(stage.run_id, Runtime(torch.device("cpu"), "bf16"))
    assert child(bf16, cfg, dataset).run_id != first.run_id


def test_hyper_caps_epochs_and_takes_the_stages_precision():
    cfg = config.load("train", {"epochs": "7", "max_epochs": "0", "lr": "0.01", "precision": "auto"})
    hyper = runner.hyper(cfg.replace(max_epochs=3), Runtime(torch.device("cpu"), "bf16"))
    assert (hyper.epochs, hyper.lr, hyper.precision) == (3, 0.01, "bf16")


def test_a_stage_hands_its_children_everything_but_its_registrations():
    stage = runner.Stage("run", CPU, frozenset({"earlier"}), [("m", "1", None)])
    assert stage.for_children() == runner.Stage("run", CPU, frozenset({"earlier"}))


def test_phase2_without_a_phase1_names_the_weights_it_starts_from(monkeypatch):
    """retrain with phase1_epochs=0: phase 2 starts from the stage's own start. From fresh weights
    (a parent given for the record only) its source is "scratch", not the parent; from the
    parent's weights, the parent."""
    from pipeline import stages
    from pipeline.lineage import Lineage

    specs = []
    monkeypatch.setattr(stages.executor, "run_children", lambda cfg, stage, children, dataset: specs.extend(children) or [])
    monkeypatch.setattr(stages, "finish", lambda run_id, results, candidates=None: None)
    cfg = config.load("retrain", {"phase1_epochs": "0", "register": "false"})
    parent, weights = "p" * 32, {"w": torch.zeros(1)}
    for lineage, source in ((Lineage(parent_run_id=parent), "scratch"),
                            (Lineage(parent_run_id=parent, init_state=weights), parent)):
        specs.clear()
        stages.two_phases(cfg, runner.Stage("s" * 32, CPU), None, lineage, "resnet")
        (phase2,) = specs
        assert (phase2.tags["source_run_id"], phase2.init_source) == (source, source)
        assert phase2.init_state is lineage.init_state


@pytest.mark.parametrize("stage_name, starts_from", [("retrain", "best"), ("deepen", "last")])
def test_phase2_starts_from_phase1s_best_pt_in_retrain_and_its_last_weights_in_deepen(monkeypatch, stage_name,
                                                                                     starts_from):
    """Phase 1 trained 2 epochs, its best at epoch 1: retrain's phase 2 gets those weights (best.pt),
    deepen's the weights phase 1 ended with (keep_final asked of phase 1 for it)."""
    from pipeline import stages
    from pipeline.lineage import Lineage

    history = train.History()
    for epoch, acc in ((1, 60.0), (2, 40.0)):
        history.add(train.EpochResult(epoch, 1.0, 1.0, acc, acc, 1.0, 100.0))
    best, last = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    phase1 = runner.RunResult("r" * 32, "phase1", "resnet", 60.0, 1, history, "test", 60.0, last)
    specs = []

    def run_children(cfg, stage, children, dataset):
        specs.extend(children)
        return [phase1] if len(specs) == 1 else []

    monkeypatch.setattr(stages.executor, "run_children", run_children)
    monkeypatch.setattr(stages.checkpoints, "load_weights", lambda run_id, path=None: best if run_id == "r" * 32 else None)
    monkeypatch.setattr(stages, "finish", lambda run_id, results, candidates=None: None)
    cfg = config.load(stage_name, {"phase1_epochs": "2", "register": "false"})
    stages.two_phases(cfg, runner.Stage("s" * 32, CPU), None, Lineage(parent_run_id="p" * 32), "resnet")
    first, second = specs
    assert first.keep_final == (starts_from == "last")
    assert second.init_state is (best if starts_from == "best" else last)
    assert second.tags["init_from"] == ("r" * 32) + ("/checkpoints/best.pt" if starts_from == "best" else "/last epoch")


@pytest.mark.parametrize("stage_name, diverged_at", [("retrain", 1), ("deepen", 1), ("deepen", 3)])
def test_phase2_never_starts_from_weights_phase1_left_diverged(monkeypatch, stage_name, diverged_at):
    """retrain goes on from phase 1's best.pt (NaN only when epoch 1 diverged), deepen from its
    last weights (NaN whenever it diverged): then the stage stops in one line, before phase 2."""
    from pipeline import stages
    from pipeline.errors import LineageError
    from pipeline.lineage import Lineage

    history = train.History()
    for epoch in range(1, diverged_at + 1):
        loss = float("nan") if epoch == diverged_at else 1.0
        history.add(train.EpochResult(epoch, loss, loss, 50.0, 50.0, 1.0, 100.0))
    history.diverged = True
    phase1 = runner.RunResult("r" * 32, "phase1", "resnet", 50.0, 1, history, "test", 50.0, {"w": torch.zeros(1)})
    asked = []
    monkeypatch.setattr(stages.executor, "run_children",
                        lambda cfg, stage, children, dataset: asked.extend(children) or [phase1])
    cfg = config.load(stage_name, {"phase1_epochs": str(diverged_at), "register": "false"})
    with pytest.raises(LineageError, match=rf"^{stage_name}: phase 1 \(run r{{32}}\) diverged at epoch {diverged_at} "
                                           r"\(its loss is not finite\), so phase 2 has no weights to start from"):
        stages.two_phases(cfg, runner.Stage("s" * 32, CPU), None, Lineage(parent_run_id="p" * 32), "resnet")
    assert [spec.tags["phase"] for spec in asked] == ["1"]  # phase 2 never asked for


def test_lr_schedule_reaches_the_loop_and_only_known_schedules_are_taken():
    from pipeline.errors import ConfigError

    cfg = config.load("train", {"lr_schedule": "cosine", "epochs": "4"})
    assert runner.hyper(cfg, CPU).lr_schedule == "cosine"
    assert runner.hyper(config.load("train"), CPU).lr_schedule == "constant"
    with pytest.raises(ConfigError, match=r"lr_schedule=linear is out of range: allowed constant\|cosine"):
        config.load("train", {"lr_schedule": "linear"})
