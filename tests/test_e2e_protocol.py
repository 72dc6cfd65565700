"""What a run logs is what ran: per-point epochs, the validation protocol, early stopping on the
seed's scale, and the refusals that replace silent fallbacks."""
import pytest
import torch

from pipeline import batching, config, data, models, runtime, train

pytestmark = pytest.mark.e2e


def test_baseline_probe_logs_the_epochs_it_trains(store):
    store.mlflow_run("baseline", store.params({"probe_epochs": "2", "epochs": "3", "repeats": "1"}))
    (run,) = store.top_level("baseline")
    children = {c.info.run_name: c for c in store.children(run.info.run_id)}
    assert set(children) == {"baseline test0 (2 epochs)", "baseline test1"}
    for name, epochs in (("baseline test0 (2 epochs)", 2), ("baseline test1", 3)):
        child = children[name]
        assert child.data.params["epochs"] == str(epochs)
        assert store.steps(child.info.run_id, "test_acc") == list(range(1, epochs + 1))
        assert child.data.params["tol"] == ("1e-05" if epochs == 2 else "1e-10")


def evaluate_checkpoint(store, run_id, cfg, dataset, split):
    net = models.build("resnet")
    net.load_state_dict(store.checkpoint(run_id))
    resolved = runtime.resolve("cpu", cfg.precision)
    device, precision = resolved.device, resolved.precision
    net = net.to(memory_format=torch.channels_last)
    batches = batching.batches(cfg, dataset, split, device, cfg.bs, channels_last=True)
    return train.evaluate(net, batches, device, precision)


def test_validation_split_drives_every_choice_and_test_is_only_reported(store):
    params = store.params({"lrs": "0.002,0.0005", "epochs": "4", "val_split": "0.1", "init": "scratch",
                           "patience": "2", "tol": "1e9"})  # tol 1e9: no epoch counts as a gain
    store.mlflow_run("tune_lr", params)
    (run,) = store.top_level("tune_lr")
    children = store.children(run.info.run_id)
    cfg = config.load("tune_lr", params)
    dataset = data.load(cfg)
    assert (dataset.n_train, dataset.n_val, dataset.n_test) == (115, 13, 64)  # test untouched
    for child in children:
        run_id, metrics = child.info.run_id, child.data.metrics
        val_acc = [m.value for m in sorted(store.client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)]
        val_loss = [m.value for m in sorted(store.client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)]
        test_acc = [m.value for m in sorted(store.client.get_metric_history(run_id, "test_acc"), key=lambda m: m.step)]
        # early stopping on the validation loss: epoch 1 sets the mark, patience 2 ends epoch 3
        assert len(val_acc) == 3 and child.data.tags["stopped_early"] == "true"
        best = val_acc.index(max(val_acc))
        assert metrics["best_val_acc"] == max(val_acc) and metrics["best_epoch"] == best + 1
        assert metrics["test_acc_at_best"] == test_acc[best] and "best_test_acc" not in metrics
        # best.pt is that epoch's weights: it scores that epoch's validation loss and accuracy
        loss, acc = evaluate_checkpoint(store, run_id, cfg, dataset, "val")
        assert acc == pytest.approx(max(val_acc)) and loss == pytest.approx(val_loss[best], rel=2e-2)
        tags = child.data.tags
        assert (tags["dataset.train.count"], tags["dataset.validation.count"], tags["dataset.test.count"]) \
            == ("115", "13", "64")
    top = max(c.data.metrics["best_val_acc"] for c in children)  # 13 images: two children may tie
    winner = next(c for c in reversed(children) if c.data.metrics["best_val_acc"] == top)  # the first swept
    assert run.data.tags["best_child_run_id"] == winner.info.run_id
    assert run.data.metrics["best_val_acc"] == winner.data.metrics["best_val_acc"]
    assert run.data.metrics["test_acc_at_best"] == winner.data.metrics["test_acc_at_best"]
    assert run.data.tags["selected_on"] == "val"


def one_line_refusal(store, *args, fragment):
    proc = store.cli(*args, "--dataset", "synthetic", "--data_dir", str(store.data_dir))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]
    assert not store.runs()  # refused before any run was created
    return lines[0]


def test_a_scalar_that_the_sweep_overrides_is_refused(store):
    one_line_refusal(store, "tune_lr", "--lr", "0.1", "--init", "scratch",
                     fragment="-P lr=0.1 would be ignored: stage tune_lr sweeps lrs=")


def test_init_parent_without_a_parent_is_refused(store):
    one_line_refusal(store, "tune_gamma", fragment="init=parent")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: device=cuda is refused where no GPU is visible")
def test_device_cuda_without_a_gpu_is_refused(store):
    one_line_refusal(store, "train", "--device", "cuda", fragment="device=cuda, but no CUDA GPU")
    one_line_refusal(store, "main", "--device", "cuda", fragment="device=cuda, but no CUDA GPU")


def test_main_with_optuna_refuses_a_study_store_in_the_mlflow_db_before_any_stage_trains(store):
    one_line_refusal(store, "main", "--tuner", "optuna", "--optuna_storage", store.uri,
                     fragment=f"optuna_storage={store.uri} is the MLflow tracking database")


def test_a_corrupt_parent_checkpoint_is_refused(store, tmp_path):
    experiment = store.client.get_experiment_by_name("Default").experiment_id
    parent = store.client.create_run(experiment).info.run_id
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    store.client.log_artifact(parent, str(tmp_path / "best.pt"), "checkpoints")
    store.client.set_terminated(parent, "FINISHED")
    proc = store.cli("tune_lr", "--parent_run_id", parent, "--dataset", "synthetic",
                     "--data_dir", str(store.data_dir))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert parent in lines[0] and "checkpoints/best.pt" in lines[0]
    assert [r.info.run_id for r in store.runs()] == [parent]
