"""`mlflow run . -e train` end to end: what MLflow recorded, lineage by run id, lineage errors."""
import pytest
import torch
import yaml

from support.digits import colour_params
from pipeline import batching, config, data, models, train

pytestmark = pytest.mark.e2e

EPOCH_METRICS = ["train_loss", "test_loss", "train_acc", "test_acc", "epoch_time_s", "train_images_per_s"]
ARTIFACTS = {"checkpoints/best.pt", "config.yaml", "model_summary.txt",
             "plots/loss.png", "plots/samples.png"}


@pytest.fixture(scope="module")
def first_run(module_store, colour_data):
    module_store.mlflow_run("train", colour_params(module_store, colour_data, "right",
                                                   {"epochs": "2", "lr": "1e-4"}))
    (run,) = module_store.top_level("train")
    return run


def history(store, run_id, key="test_acc"):
    return [m.value for m in sorted(store.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def batches_tracked(state):
    """BatchNorm's count of training batches: it travels with the weights from run to run."""
    return int(state["block1.1.num_batches_tracked"])


def evaluate_on_test_split(params, state):
    """The run's own evaluation of `state`, repeated in this process."""
    cfg = config.load("train", params)
    device = torch.device("cpu")
    model = models.build("resnet")
    model.load_state_dict(state)
    model = model.to(memory_format=torch.channels_last)
    test_batches = batching.batches(cfg, data.load(cfg), "test", device, cfg.bs, None, channels_last=True)
    return train.evaluate(model, test_batches, device, "fp32")


def test_train_run_records_metrics_params_tags_and_artifacts(module_store, first_run):
    run_id = first_run.info.run_id
    assert first_run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert module_store.steps(run_id, key) == [1, 2], key
    metrics = first_run.data.metrics
    accs = history(module_store, run_id)
    assert metrics["best_test_acc"] == max(accs) and metrics["best_epoch"] == accs.index(max(accs)) + 1
    assert metrics["test_acc_at_best"] == metrics["best_test_acc"]  # selected on test: the same figure
    assert max(accs) >= 80  # it learned (chance is 10%), so a worse checkpoint would show
    assert metrics["total_time_s"] == pytest.approx(sum(history(module_store, run_id, "epoch_time_s")))
    assert ARTIFACTS <= module_store.artifacts(run_id)
    assert "checkpoints/last.pt" not in module_store.artifacts(run_id)  # only for resuming: dropped
    assert first_run.data.tags["stage"] == "train"
    assert first_run.data.tags["arch"] == "resnet"
    assert first_run.data.tags["source_run_id"] == "scratch"
    params = first_run.data.params
    assert params["lr"] == "1e-4"  # as the user spelled it, logged by `mlflow run`
    assert params["alpha"] == "0.99" and params["epochs"] == "2" and params["bs"] == "32"
    assert params["eval_bs"] == "0" and params["eval_bs_resolved"] == "32"  # automatic: bs on a CPU
    resolved = yaml.safe_load(module_store.download(run_id, "config.yaml").read_text())
    assert resolved["lr"] == "0.0001" and resolved["stage"] == "train"


def test_train_run_records_system_metrics_of_this_machine(module_store, first_run):
    """MLflow's system/ metrics, sampled while the run trained (runner starts the monitor for a
    run made with MlflowClient): real readings of this machine, not placeholders."""
    import psutil

    run_id, total_mb = first_run.info.run_id, psutil.virtual_memory().total / 1e6
    cpu = history(module_store, run_id, "system/cpu_utilization_percentage")
    used_mb = history(module_store, run_id, "system/system_memory_usage_megabytes")
    used_pct = history(module_store, run_id, "system/system_memory_usage_percentage")
    assert len(cpu) >= 1 and len(used_mb) == len(used_pct) == len(cpu)
    assert module_store.steps(run_id, "system/cpu_utilization_percentage") == list(range(len(cpu)))
    assert all(0 <= c <= 100 for c in cpu) and max(cpu) > 0  # training kept a core busy
    for mb, pct in zip(used_mb, used_pct):
        # at least what torch and this test hold, at most the machine; the two figures agree
        assert 300 < mb < total_mb
        assert pct == pytest.approx(100 * mb / total_mb, abs=0.2)


def test_best_checkpoint_loads_into_the_tagged_arch(module_store, first_run):
    state = module_store.checkpoint(first_run.info.run_id)
    model = models.build(first_run.data.tags["arch"])
    model.load_state_dict(state)  # strict: every key and shape matches
    assert models.count_parameters(model) == 2_629_706


def test_parent_run_id_starts_from_its_checkpoint(module_store, first_run, colour_data):
    parent = first_run.info.run_id
    # lr 1e-12: one epoch cannot move the weights, so the child's best.pt shows where it started
    module_store.mlflow_run("train", colour_params(module_store, colour_data, "right", {
        "epochs": "1", "lr": "1e-12", "parent_run_id": parent}))
    child = module_store.top_level("train")[0]
    assert child.info.run_id != parent and child.info.status == "FINISHED"
    assert child.data.tags["source_run_id"] == parent
    assert child.data.tags["init_from"] == f"{parent}/checkpoints/best.pt"
    parent_state, child_state = module_store.checkpoint(parent), module_store.checkpoint(child.info.run_id)
    names = dict(models.build("resnet").named_parameters())
    assert set(names) < set(parent_state) and set(child_state) == set(parent_state)
    for name in names:  # BatchNorm's running statistics move with any forward pass; weights do not
        assert torch.allclose(child_state[name], parent_state[name], rtol=0, atol=1e-9), name
    assert batches_tracked(child_state) == batches_tracked(parent_state) + 8  # 256 images, bs 32


def test_best_checkpoint_is_the_best_epoch_not_the_last(module_store, first_run, colour_data):
    """From a parent that learned the colours, train on shifted labels: test accuracy falls, so
    best.pt must hold an early epoch, and evaluating it must give the logged best test_acc."""
    parent = first_run.info.run_id
    params = colour_params(module_store, colour_data, "shifted", {"epochs": "3", "lr": "1e-5",
                                                                  "parent_run_id": parent})
    module_store.mlflow_run("train", params)
    run = module_store.top_level("train")[0]
    run_id, metrics = run.info.run_id, run.data.metrics
    accs, losses = history(module_store, run_id), history(module_store, run_id, "test_loss")
    assert len(accs) == 3 and accs[-1] < max(accs)  # the premise: a later epoch is worse
    best_epoch = accs.index(max(accs)) + 1
    assert metrics["best_test_acc"] == max(accs) and metrics["best_epoch"] == best_epoch
    best = module_store.checkpoint(run_id)
    loss, acc = evaluate_on_test_split(params, best)
    assert acc == metrics["best_test_acc"] and loss == pytest.approx(losses[best_epoch - 1], rel=1e-5)
    assert batches_tracked(best) == batches_tracked(module_store.checkpoint(parent)) + 8 * best_epoch
    assert "checkpoints/last.pt" not in module_store.artifacts(run_id)  # dropped once FINISHED


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
