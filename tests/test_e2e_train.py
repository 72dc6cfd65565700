"""`mlflow run . -e train` end to end: what MLflow recorded, lineage by run id, lineage errors."""
import pytest
import torch
import yaml

from pipeline import models

pytestmark = pytest.mark.e2e

EPOCH_METRICS = ["train_loss", "test_loss", "train_acc", "test_acc", "epoch_time_s", "train_images_per_s"]
ARTIFACTS = {"checkpoints/best.pt", "config.yaml", "model_summary.txt",
             "plots/loss.png", "plots/samples.png"}


@pytest.fixture(scope="module")
def first_run(module_store):
    module_store.mlflow_run("train", module_store.params({"epochs": "2", "lr": "1e-3"}))
    (run,) = module_store.top_level("train")
    return run


def test_train_run_records_metrics_params_tags_and_artifacts(module_store, first_run):
    run_id = first_run.info.run_id
    assert first_run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert module_store.steps(run_id, key) == [1, 2], key
    metrics = first_run.data.metrics
    accs = [m.value for m in sorted(module_store.client.get_metric_history(run_id, "test_acc"),
                                    key=lambda m: m.step)]
    assert metrics["best_test_acc"] == max(accs) and metrics["best_epoch"] == accs.index(max(accs)) + 1
    assert metrics["test_acc_at_best"] == metrics["best_test_acc"]  # selected on test: the same figure
    assert metrics["total_time_s"] > 0
    assert ARTIFACTS <= module_store.artifacts(run_id)
    assert "checkpoints/last.pt" not in module_store.artifacts(run_id)  # only for resuming: dropped
    assert first_run.data.tags["stage"] == "train"
    assert first_run.data.tags["arch"] == "resnet"
    assert first_run.data.tags["source_run_id"] == "scratch"
    params = first_run.data.params
    assert params["lr"] == "1e-3"  # as the user spelled it, logged by `mlflow run`
    assert params["alpha"] == "0.99" and params["epochs"] == "2" and params["bs"] == "64"
    config_text = module_store.client.download_artifacts(run_id, "config.yaml")
    resolved = yaml.safe_load(open(config_text))
    assert resolved["lr"] == "0.001" and resolved["stage"] == "train"


def test_best_checkpoint_loads_into_the_tagged_arch(module_store, first_run):
    path = module_store.client.download_artifacts(first_run.info.run_id, "checkpoints/best.pt")
    state = torch.load(path, weights_only=True)
    model = models.build(first_run.data.tags["arch"])
    model.load_state_dict(state)  # strict: every key and shape matches
    assert models.count_parameters(model) == 2_629_706


def test_parent_run_id_starts_from_its_checkpoint(module_store, first_run):
    parent = first_run.info.run_id
    module_store.mlflow_run("train", module_store.params({"epochs": "1", "lr": "0.0001",
                                                          "parent_run_id": parent}))
    child = next(r for r in module_store.top_level("train") if r.info.run_id != parent)
    assert child.info.status == "FINISHED"
    assert child.data.tags["source_run_id"] == parent
    assert child.data.tags["init_from"] == f"{parent}/checkpoints/best.pt"


def test_unknown_parent_fails_with_one_clear_line(module_store):
    before = len(module_store.runs())
    proc = module_store.mlflow_run("train", module_store.params({"parent_run_id": "nonexistent"}),
                                   check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "parent run 'nonexistent' was not found" in errors[0]
    newest = module_store.runs()[0]
    assert len(module_store.runs()) == before + 1 and newest.info.status == "FAILED"
    assert not module_store.artifacts(newest.info.run_id)  # no checkpoint, nothing else


def test_parent_of_another_arch_is_refused_before_training(module_store, first_run):
    proc = module_store.cli("train", "--arch", "vgg", "--parent_run_id", first_run.info.run_id,
                            *sum(([f"--{k}", v] for k, v in module_store.params().items()), []))
    assert proc.returncode == 2
    assert "does not fit arch=vgg (it holds a resnet model)" in proc.stderr
    assert "epoch 1" not in proc.stdout
