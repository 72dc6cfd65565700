"""executor: children trained in this process (executor=local), in the order given, with the
caller's callbacks (progress, a pruning hook) and the Ray task's identity in their heartbeat;
in a real temporary tracking store. executor=ray is in test_ray.py."""
import functools

import pytest
import torch

from pipeline import config, data, executor, lifecycle, runner
from pipeline.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")


@pytest.fixture
def tiny(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    cfg = config.load("tune_lr", store.params({"epochs": "2", "limit_train": "64", "limit_test": "32",
                                               "bs": "32", "init": "scratch", "device": "cpu",
                                               "precision": "fp32", "patience": "50"}))
    stage = runner.Stage(store.client.create_run("0").info.run_id, CPU)
    return store, cfg, data.load(cfg), stage


def stop_after(epoch: int):
    """A make_hook as autotune's: built where the child trains, True ends it after `epoch`."""
    return lambda end: end.result.epoch >= epoch


def test_local_children_train_in_order_and_a_hook_ends_one_early(tiny):
    store, cfg, dataset, stage = tiny
    specs = [executor.ChildSpec("lr 0.01", cfg.replace(lr=0.01), "resnet"),
             executor.ChildSpec("lr 0.001", cfg.replace(lr=0.001), "resnet",
                                make_hook=functools.partial(stop_after, 1))]
    results = executor.run_children(cfg, stage, specs, dataset)
    assert [r.name for r in results] == ["lr 0.01", "lr 0.001"]
    assert [len(r.history.epochs) for r in results] == [2, 1]
    assert [store.steps(r.run_id, "test_acc") for r in results] == [[1, 2], [1]]
    assert {store.client.get_run(r.run_id).info.status for r in results} == {"FINISHED"}
    assert [store.client.get_run(r.run_id).data.params["lr"] for r in results] == ["0.01", "0.001"]


def test_progress_sees_every_epoch_and_a_tasks_child_carries_the_task_in_its_heartbeat(tiny):
    store, cfg, dataset, stage = tiny
    seen = []
    result = executor.train_child(stage, executor.ChildSpec("point", cfg, "resnet"), dataset,
                                  progress=lambda end: seen.append(end.result.epoch), task="ray-task:abc")
    assert seen == [1, 2]
    stamp = lifecycle.parse_stamp(store.client.get_run(result.run_id).data.tags[lifecycle.HEARTBEAT])
    assert stamp["task"] == "ray-task:abc"
    # a task beats its child only: the stage run's writer is the driver
    assert lifecycle.HEARTBEAT not in store.client.get_run(stage.run_id).data.tags
    local = executor.train_child(stage, executor.ChildSpec("local point", cfg, "resnet"), dataset)
    assert "task" not in lifecycle.parse_stamp(store.client.get_run(local.run_id).data.tags[lifecycle.HEARTBEAT])
    assert lifecycle.HEARTBEAT in store.client.get_run(stage.run_id).data.tags


def test_a_takeover_reaches_a_ray_driver_as_itself_with_the_run_it_names():
    """A worker's error crosses to the driver pickled, inside a RayTaskError: TakenOver must come
    back whole (a one-line refusal naming its run), not as an UnserializableException."""
    from ray.exceptions import RayTaskError

    from pipeline.errors import TakenOver

    try:
        raise TakenOver("run R was taken over", "R")
    except TakenOver as err:
        crossed = RayTaskError.from_bytes(RayTaskError("fn", "traceback", err, pid=1, ip="127.0.0.1").to_bytes())
    assert isinstance(crossed.cause, TakenOver) and crossed.cause.run_id == "R"
    assert str(crossed.cause) == "run R was taken over"


def test_a_ray_driver_reads_a_takeover_of_its_stage_run_and_rides_out_a_store_it_cannot_read(monkeypatch, capsys):
    """The driver asks every WRITER_CHECK_S: a claim by another process stops it; a store that
    cannot answer for a moment stops nothing (its children train on), as a missed heartbeat."""
    from mlflow.exceptions import MlflowException

    from pipeline import executor, lifecycle
    from pipeline.errors import TakenOver

    def store_away(run_id):
        raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed")

    monkeypatch.setattr(lifecycle, "check_still_writer", store_away)
    executor.still_writer("R")
    assert "could not read stage run R (MlflowException: API request" in capsys.readouterr().out

    def claimed(run_id):
        raise TakenOver(f"run {run_id} was taken over", run_id)

    monkeypatch.setattr(lifecycle, "check_still_writer", claimed)
    with pytest.raises(TakenOver):
        executor.still_writer("R")


def test_a_driver_stopping_leaves_a_run_another_live_process_claimed_whatever_heartbeat_came_after(store, monkeypatch):
    """The old writer's heartbeat thread may beat once just after the claim lands: the claim still
    says whose the run is. A run only this driver's task wrote is ended KILLED."""
    from pipeline import config, executor, lifecycle, runner, runtime

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    stage_run = store.client.create_run("0").info.run_id
    mine = executor.ray_task("T")

    def child(*stamps) -> str:
        run_id = store.client.create_run("0", tags={"mlflow.parentRunId": stage_run}).info.run_id
        for key, value in stamps:
            (store.client.log_param if key.startswith(lifecycle.CLAIM) else store.client.set_tag)(run_id, key, value)
        return run_id

    elsewhere = dict(host="elsewhere", boot="another-machine", pid="4242", start="1")
    taken = child((lifecycle.HEARTBEAT, lifecycle.stamp(mine)),
                  (f"{lifecycle.CLAIM}1", lifecycle.stamp(**elsewhere)),
                  (lifecycle.HEARTBEAT, lifecycle.stamp(mine)))  # newer than the claim
    ours = child((lifecycle.HEARTBEAT, lifecycle.stamp(mine)))
    stage = runner.Stage(stage_run, runtime.of(config.load("tune_lr", {"device": "cpu"})))
    assert executor.stop([], stage, {}, {mine}) == [ours]
    assert store.client.get_run(taken).info.status == "RUNNING"
    assert store.client.get_run(ours).info.status == "KILLED"
