"""checkpoints: the CheckpointWriter and host_copy (real torch.save writes into a temporary
folder), the EpochRecorder's order and hold-back of an epoch's record (a real temporary tracking
store), and runner.train_in_run stopped by a signal while it waits for the last record. Resuming
from what it writes is covered end to end in test_e2e_train, test_faults and test_e2e_continue."""
import threading
import time

import pytest
import torch

from pipeline import checkpoints, models, runtime, tracking, train

CPU = torch.device("cpu")


def test_jobs_run_in_order_even_when_the_first_is_slow(tmp_path):
    writer, order = checkpoints.CheckpointWriter(), []
    path = tmp_path / "last.pt"

    def write(value, delay):
        time.sleep(delay)
        checkpoints.atomic_save({"epoch": value}, path)
        order.append(value)

    writer.submit(lambda: write(1, 0.3))
    writer.submit(lambda: write(2, 0.0))  # waits for epoch 1's write before it starts
    writer.wait()
    assert order == [1, 2]
    assert torch.load(path, weights_only=True) == {"epoch": 2}


def test_wait_returns_once_the_file_is_written_and_submit_does_not(tmp_path):
    writer, started, release = checkpoints.CheckpointWriter(), threading.Event(), threading.Event()
    path = tmp_path / "best.pt"

    def write():
        started.set()
        release.wait(5)
        checkpoints.atomic_save({"w": torch.arange(3)}, path)

    writer.submit(write)
    assert started.wait(5) and not path.exists()  # submit returned while the job is still to write
    release.set()
    writer.wait()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left behind


def test_an_error_in_the_writer_surfaces_on_the_next_wait_or_submit_once(tmp_path):
    writer, ran = checkpoints.CheckpointWriter(), []
    disk_full = OSError(28, "No space left on device")

    def fail():
        raise disk_full

    writer.submit(fail)
    with pytest.raises(OSError) as err:
        writer.wait()
    assert err.value is disk_full
    assert writer.wait() is None  # raised once
    writer.submit(fail)
    with pytest.raises(OSError):
        writer.submit(lambda: ran.append(1))  # the next epoch's record is refused, not started
    assert ran == []
    writer.submit(fail)
    assert writer.wait(raise_error=False) is disk_full  # for a caller already handling another error


def test_host_copy_is_what_the_model_was_when_copied_not_what_training_made_it(tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet").to(memory_format=torch.channels_last)
    optimizer = train.make_optimizer(model, train.Hyper(epochs=1, lr=1e-2))

    def step():
        loss = model(torch.randn(4, 3, 28, 28).contiguous(memory_format=torch.channels_last)).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # RMSprop has its state now
    snapshot = {"epoch": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    copied = checkpoints.host_copy(snapshot, CPU)
    writer = checkpoints.CheckpointWriter()
    writer.submit(lambda: checkpoints.atomic_save(copied, tmp_path / "last.pt"))
    step()  # training goes on changing the weights, BatchNorm statistics and optimizer state in place
    writer.wait()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["model"].keys() == frozen.keys()
    assert all(torch.equal(saved["model"][k], v) for k, v in frozen.items())
    assert not torch.equal(saved["model"]["fc.weight"], model.state_dict()["fc.weight"])
    assert saved["model"]._metadata == model.state_dict()._metadata  # module versions travel too
    fresh = models.build("resnet")
    fresh.load_state_dict(saved["model"])
    train.make_optimizer(fresh, train.Hyper(epochs=1, lr=1e-2)).load_state_dict(saved["optimizer"])


def test_a_signal_in_the_last_wait_still_joins_the_writer_before_the_run_stops(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while train_in_run waits for the last epoch's record: the record is
    finished (joined again) before the interrupt leaves, so the run stops with it written."""
    import mlflow

    from pipeline import config, data, runner

    uri = tracking.new_local_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    cfg = config.load("train", {"dataset": "synthetic", "data_dir": str(tmp_path / "data"), "device": "cpu",
                                "synthetic_train": "64", "synthetic_test": "32", "bs": "32", "epochs": "1",
                                "log_every": "1000"})
    dataset = data.load(cfg)
    run_id = tracking.client().create_run("0").info.run_id
    fitted, real_fit, real_log, real_wait = [], train.fit, tracking.log_epoch, checkpoints.CheckpointWriter.wait

    def fit(*args, **kwargs):
        history = real_fit(*args, **kwargs)
        fitted.append(True)
        return history

    def slow_log(run, step, metrics):  # the epoch's record is still being written when fit returns
        if step >= 1:
            time.sleep(1.5)
        return real_log(run, step, metrics)

    def wait(self, raise_error=True):
        if fitted and raise_error:
            fitted.clear()
            raise KeyboardInterrupt("SIGTERM")  # as a signal landing in the join: the write goes on
        return real_wait(self, raise_error)

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(tracking, "log_epoch", slow_log)
    monkeypatch.setattr(checkpoints.CheckpointWriter, "wait", wait)
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.train_in_run(run_id, cfg, dataset, arch="resnet", runtime=runtime.of(cfg))
    finally:
        mlflow.set_tracking_uri(None)
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-writer"]
    client = mlflow.MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "test_acc")] == [1]
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.pt",
                                                                             "checkpoints/last.pt"}


def test_a_record_that_fails_after_the_training_failed_is_one_line_without_a_password(tmp_path, monkeypatch, capsys):
    """Training fails, then finishing the last epoch's record fails too (a store's error quotes its
    URL whole): train_in_run says so in a line that hides the password, and raises the first."""
    import mlflow
    import requests

    from pipeline import config, data, runner

    uri = tracking.new_local_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    cfg = config.load("train", {"dataset": "synthetic", "data_dir": str(tmp_path / "data"), "device": "cpu",
                                "synthetic_train": "64", "synthetic_test": "32", "bs": "32", "epochs": "1"})
    dataset = data.load(cfg)
    run_id = tracking.client().create_run("0").info.run_id
    upload = requests.HTTPError("500 Server Error: for url: http://alice:s3cret@tracking:5000/api/2.0/x\nmore")

    def fit(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(checkpoints.EpochRecorder, "abandon", lambda self: upload)
    try:
        with pytest.raises(RuntimeError, match="training failed"):
            runner.train_in_run(run_id, cfg, dataset, arch="resnet", runtime=runtime.of(cfg))
    finally:
        mlflow.set_tracking_uri(None)
    said = [line for line in capsys.readouterr().out.splitlines() if "failed too" in line]
    assert said == [f"run {run_id}: writing the last epoch's record failed too: HTTPError: "
                    "500 Server Error: for url: http://***@tracking:5000/api/2.0/x"]


# -- the EpochRecorder -------------------------------------------------------------------------------

def epoch_end(epoch: int, is_best: bool, history: train.History) -> train.EpochEnd:
    result = train.EpochResult(epoch, 1.0 / epoch, 2.0 / epoch, 10.0 * epoch, 5.0 * epoch, 1.0, 100.0)
    history.add(result)
    weights = {"w": torch.full((2,), float(epoch))}
    return train.EpochEnd(result, is_best, history,
                          lambda: {"format": checkpoints.CHECKPOINT_FORMAT, "epoch": epoch, "model": weights,
                                   "history": history.to_state()})


@pytest.fixture
def recorded_run(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    run_id = store.client.create_run("0").info.run_id

    def saved(path):
        return store.checkpoint(run_id, path)

    return store, run_id, saved


def test_an_epochs_metrics_wait_for_a_last_pt_that_covers_them(recorded_run):
    store, run_id, saved = recorded_run
    recorder = checkpoints.EpochRecorder(run_id, CPU, every=3, logged=set())
    history = train.History()
    logged_after = []
    for epoch, best in ((1, True), (2, False), (3, False), (4, False)):
        assert recorder(epoch_end(epoch, best, history)) is False  # it never stops training
        recorder.writer.wait()
        logged_after.append(store.steps(run_id, "test_acc"))
    # epoch 1 (a best) is written at once; 2 waits for epoch 3's last.pt; 4 for close()
    assert logged_after == [[1], [1], [1, 2, 3], [1, 2, 3]]
    assert saved(checkpoints.LAST)["epoch"] == 3
    assert torch.equal(saved(checkpoints.BEST)["w"], torch.full((2,), 1.0))  # best.pt: the weights alone
    recorder.close()
    assert store.steps(run_id, "test_acc") == [1, 2, 3, 4] and saved(checkpoints.LAST)["epoch"] == 4
    assert [m.value for m in store.client.get_metric_history(run_id, "test_acc")] == [5.0, 10.0, 15.0, 20.0]


def test_a_best_epoch_writes_best_pt_and_last_pt_together(recorded_run):
    store, run_id, saved = recorded_run
    recorder = checkpoints.EpochRecorder(run_id, CPU, every=10, logged=set())
    history = train.History()
    recorder(epoch_end(1, False, history))
    recorder(epoch_end(2, True, history))
    recorder.writer.wait()
    assert saved(checkpoints.LAST)["epoch"] == 2 and torch.equal(saved(checkpoints.BEST)["w"], torch.full((2,), 2.0))
    assert store.steps(run_id, "test_acc") == [1, 2]


def test_a_resumed_run_logs_what_its_last_pt_covers_once(recorded_run):
    store, run_id, _ = recorded_run
    history = train.History()
    for epoch in (1, 2, 3):
        epoch_end(epoch, False, history)
    store.client.log_metric(run_id, "test_acc", 5.0, step=1)  # epoch 1 logged before the kill
    recorder = checkpoints.EpochRecorder(run_id, CPU, every=1, logged={1})
    resume = {"epoch": 3, "model": {"w": torch.zeros(2)}, "history": history.to_state()}
    recorder.catch_up(resume)
    assert store.steps(run_id, "test_acc") == [1, 2, 3]
    recorder.catch_up(resume)  # nothing twice
    assert store.steps(run_id, "test_acc") == [1, 2, 3]


def test_a_kill_between_last_pt_and_best_pt_leaves_a_best_pt_of_the_epoch_the_record_names(recorded_run, monkeypatch):
    """Epoch 1 best, 2 not, 3 best; the writer dies before epoch 3's second file. The resume
    must hold, in best.pt, the weights of the epoch its last.pt's history names as best."""
    store, run_id, saved = recorded_run
    recorder = checkpoints.EpochRecorder(run_id, CPU, every=1, logged=set())
    history = train.History()
    for epoch, val in ((1, 50.0), (2, 40.0)):
        result = train.EpochResult(epoch, 1.0, 1.0, 1.0, val, 1.0, 100.0)
        recorder(train.EpochEnd(result, history.add(result), history, snapshot_of(epoch, history)))
        recorder.writer.wait()
    written = []
    real_write = checkpoints.write_checkpoint

    def dies_at(run, path, obj):
        if written:  # epoch 3's second file: the kill (SIGKILL, the OOM killer) comes first
            raise OSError("killed")
        written.append(path)
        real_write(run, path, obj)

    monkeypatch.setattr(checkpoints, "write_checkpoint", dies_at)
    result = train.EpochResult(3, 1.0, 1.0, 1.0, 60.0, 1.0, 100.0)
    recorder(train.EpochEnd(result, history.add(result), history, snapshot_of(3, history)))
    assert isinstance(recorder.abandon(), OSError) and len(written) == 1
    monkeypatch.setattr(checkpoints, "write_checkpoint", real_write)
    resume = saved(checkpoints.LAST)
    checkpoints.EpochRecorder(run_id, CPU, every=1, logged=set()).catch_up(resume)  # as the resume starts
    best_epoch = train.History.from_state(resume["history"]).best_epoch
    assert torch.equal(saved(checkpoints.BEST)["w"], torch.full((2,), float(best_epoch)))
    assert best_epoch == resume["epoch"] == 3  # last.pt is written first: epoch 3 is not trained again


def snapshot_of(epoch: int, history: train.History):
    weights = {"w": torch.full((2,), float(epoch))}
    state = {"format": checkpoints.CHECKPOINT_FORMAT, "epoch": epoch, "model": weights,
             "history": history.to_state()}
    return lambda: state


def test_abandon_finishes_the_record_in_flight_and_returns_its_error(recorded_run, monkeypatch):
    store, run_id, saved = recorded_run
    recorder = checkpoints.EpochRecorder(run_id, CPU, every=1, logged=set())
    history = train.History()
    refused = OSError(28, "No space left on device")

    def slow_log(run, step, metrics):
        time.sleep(0.3)
        raise refused

    monkeypatch.setattr(tracking, "log_epoch", slow_log)
    recorder(epoch_end(1, True, history))
    assert recorder.abandon() is refused  # waited for: last.pt is whole before the error surfaces
    assert saved(checkpoints.LAST)["epoch"] == 1


def test_a_checkpoint_the_disk_cannot_hold_is_one_line_and_the_one_before_stays_whole(recorded_run, monkeypatch):
    from support.faults import disk_full_midway

    from pipeline.errors import CheckpointError

    store, run_id, saved = recorded_run
    checkpoints.save_checkpoint(run_id, checkpoints.LAST, {"epoch": 1, "w": torch.ones(3)})
    monkeypatch.setattr(checkpoints, "atomic_write", disk_full_midway(checkpoints.atomic_write, lambda b: b[:10]))
    with pytest.raises(CheckpointError) as err:
        checkpoints.save_checkpoint(run_id, checkpoints.LAST, {"epoch": 2, "w": torch.zeros(3)})
    message = str(err.value)
    assert message.startswith(f"cannot write {checkpoints.LAST} of run {run_id} to ") and "\n" not in message
    assert "(No space left on device): free some space there" in message
    kept = saved(checkpoints.LAST)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3))
    local = tracking.local_artifact_dir(run_id) / "checkpoints"
    assert sorted(p.name for p in local.iterdir()) == ["last.pt"]  # no temp file left beside it


def test_a_checkpoint_lands_where_mlflow_reads_an_artifact_location_with_an_escaped_character(store, tmp_path, monkeypatch):
    # Path.as_uri() escapes a space as %20; MLflow's local store decodes it, so must we
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    location = (tmp_path / "ml artifacts").as_uri()
    assert "%20" in location
    run_id = store.client.create_run(store.client.create_experiment("escaped", artifact_location=location)).info.run_id
    checkpoints.save_checkpoint(run_id, checkpoints.BEST, {"w": torch.arange(4.0)})
    assert tracking.has_artifact(run_id, checkpoints.BEST)  # MLflow lists it: it is where MLflow looks
    assert torch.equal(checkpoints.load_weights(run_id, checkpoints.BEST)["w"], torch.arange(4.0))
    assert not (tmp_path / "ml%20artifacts").exists()
