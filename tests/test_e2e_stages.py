"""The whole study through `mlflow run . -e main` at toy size: lineage, nesting, reuse, sweeps."""
import math

import pytest
import torch

from pipeline import models
from pipeline.workflow import CHAIN

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def study(module_store):
    proc = module_store.mlflow_run("main", main_params(module_store))
    assert "starting `mlflow run -e model_selection`" in proc.stdout + proc.stderr
    return module_store


def main_params(store, **extra):
    params = store.params({"epochs": "1", "repeats": "1", **extra})
    params.pop("bs")  # main passes data params and caps on, not stage hyperparameters
    return params


def stage_run(store, stage):
    runs = store.top_level(stage)
    assert len(runs) == 1, f"{stage}: {len(runs)} top-level runs"
    return runs[0]


def best_state(store, run_id):
    return torch.load(store.client.download_artifacts(run_id, "checkpoints/best.pt"), weights_only=True)


def batches_tracked(state):
    """BatchNorm's count of training batches (None without BatchNorm): it travels with the weights."""
    counts = {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert len(counts) <= 1
    return counts.pop() if counts else None


def max_weight_change(a, b, arch):
    return max((a[name] - b[name]).abs().max().item() for name, _ in models.build(arch).named_parameters())


def test_one_finished_top_level_run_per_stage_chained_by_run_id(study):
    previous = None
    for stage in CHAIN:
        run = stage_run(study, stage)
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED", stage
        assert tags["stage"] == stage and tags["arch"] in ("resnet", "vgg", "resnet2")
        assert tags["source_run_id"] == (previous.info.run_id if previous else "scratch"), stage
        assert "checkpoints/best.pt" in study.artifacts(run.info.run_id), stage
        children = {c.info.run_id: c for c in study.children(run.info.run_id)}
        assert tags["best_child_run_id"] in children, stage
        best_child = children[tags["best_child_run_id"]]
        for child in children.values():  # one epoch each: its best is that epoch
            assert child.data.metrics["best_test_acc"] == \
                study.client.get_metric_history(child.info.run_id, "test_acc")[0].value
        assert metrics["best_test_acc"] == max(c.data.metrics["best_test_acc"] for c in children.values())
        assert best_child.data.metrics["best_test_acc"] == metrics["best_test_acc"]
        assert "plots/compare_test_acc.png" in study.artifacts(run.info.run_id)
        # every child logs the same params and per-epoch metrics, so the compare view lines up
        keys = {frozenset(c.data.params) for c in children.values()}
        assert len(keys) == 1 and {"lr", "gamma", "wd", "bs", "seed"} <= set(next(iter(keys)))
        assert all(study.steps(c.info.run_id, "test_acc") == [1] for c in children.values())
        previous = run


def test_checkpoints_follow_the_lineage(study):
    """Each stage carries its best child's best.pt, and each child's best.pt grew out of the
    checkpoint its source_run_id names: BatchNorm's batch counter is the source's plus this
    child's own batches (256 images per epoch)."""
    checked = 0
    for stage in CHAIN:
        run = stage_run(study, stage)
        state = best_state(study, run.info.run_id)
        best_child = best_state(study, run.data.tags["best_child_run_id"])
        assert state.keys() == best_child.keys() and all(torch.equal(state[k], best_child[k]) for k in state)
        for child in study.children(run.info.run_id):
            count = batches_tracked(best_state(study, child.info.run_id))
            if count is None:  # vgg has no BatchNorm
                continue
            source = child.data.tags["source_run_id"]
            start = 0 if source == "scratch" else batches_tracked(best_state(study, source))
            steps = math.ceil(256 / int(child.data.params["bs"])) * int(child.data.metrics["best_epoch"])
            assert count == start + steps, (stage, child.info.run_name)
            checked += 1
    assert checked >= 2  # deepen's two phases (resnet2) at least
    # retrain's phase 2 starts from phase 1's best.pt: two steps at lr 1e-5 move no weight by more
    # than 2 x 10 x lr (RMSprop), while phase 1's own first step moved every weight by 10 x 1e-3
    phases = {c.data.tags["phase"]: c for c in study.children(stage_run(study, "retrain").info.run_id)}
    arch = phases["2"].data.tags["arch"]
    phase1, phase2 = (best_state(study, phases[p].info.run_id) for p in "12")
    assert max_weight_change(phase2, phase1, arch) < 2.1e-4


def test_model_selection_compares_archs_and_names_a_winner(study):
    run = stage_run(study, "model_selection")
    names = sorted(c.info.run_name for c in study.children(run.info.run_id))
    assert names == ["model_selection resnet #1", "model_selection vgg #1"]
    metrics = run.data.metrics
    for arch, count in (("resnet", 2_629_706), ("vgg", 42_924_234)):
        assert metrics[f"{arch}_params"] == count
        assert {f"{arch}_mean_time_s", f"{arch}_acc_mean", f"{arch}_acc_std"} <= set(metrics)
    winner = run.data.tags["winner"]
    assert metrics[f"{winner}_acc_mean"] == max(metrics["resnet_acc_mean"], metrics["vgg_acc_mean"])
    assert stage_run(study, "baseline").data.tags["arch"] == winner  # baseline takes the winner


def test_stage_children_follow_the_seed(study):
    baseline = study.children(stage_run(study, "baseline").info.run_id)
    assert sorted(c.info.run_name for c in baseline) == ["baseline test0 (1 epochs)", "baseline test1"]
    tune_lr = study.children(stage_run(study, "tune_lr").info.run_id)
    assert sorted(float(c.data.params["lr"]) for c in tune_lr) == [0.0001, 0.0002, 0.00025, 0.0005, 0.00075]
    assert all(c.info.run_name.startswith("tune_lr lr=") for c in tune_lr)
    assert [c.data.params["gamma"] for c in study.children(stage_run(study, "tune_gamma").info.run_id)] \
        == ["0.0001"]
    (overfit,) = study.children(stage_run(study, "overfit").info.run_id)
    assert (overfit.data.params["wd"], overfit.data.params["bs"]) == ("5e-05", "128")
    phases = {c.data.tags["phase"]: c for c in study.children(stage_run(study, "retrain").info.run_id)}
    assert phases["2"].data.tags["source_run_id"] == phases["1"].info.run_id
    assert (phases["1"].data.params["lr"], phases["2"].data.params["lr"]) == ("0.001", "1e-05")
    deepen = study.children(stage_run(study, "deepen").info.run_id)
    assert {c.data.tags["arch"] for c in deepen} == {"resnet2"}
    assert {c.data.params["augment"] for c in deepen} == {"false"}


def test_main_logs_a_summary_and_registers_a_champion(study):
    (main,) = study.top_level("main")
    assert main.info.status == "FINISHED"
    summary = open(study.client.download_artifacts(main.info.run_id, "summary.md")).read()
    for stage in CHAIN:
        assert stage_run(study, stage).info.run_id in summary
    champion = study.client.get_model_version_by_alias("svhn-classifier", "champion")
    assert champion.run_id in {stage_run(study, s).info.run_id for s in ("retrain", "deepen")}


def test_running_main_again_reuses_every_stage(study):
    before = {r.info.run_id for r in study.runs()}
    proc = study.mlflow_run("main", main_params(study))
    output = proc.stdout + proc.stderr
    new = [r for r in study.runs() if r.info.run_id not in before]
    assert [r.data.tags.get("stage") for r in new] == ["main"]  # no new training run
    assert output.count("reusing FINISHED run") == len(CHAIN)
    # what makes a rerun cheap: no stage process is started (each costs ~8 s before any work)
    assert "starting `mlflow run" not in output and "python -m pipeline model_selection" not in output


def test_a_changed_param_reruns_that_stage_and_the_ones_after(study):
    before = {s: stage_run(study, s).info.run_id for s in CHAIN}
    # registered_model only matters from retrain on: earlier stages are reused, later ones rerun
    study.mlflow_run("main", main_params(study, registered_model="svhn-alt"))
    for stage in CHAIN:
        runs = study.top_level(stage)
        assert len(runs) == (2 if stage in ("retrain", "deepen") else 1), stage
    new_retrain = study.top_level("retrain")[0]
    assert new_retrain.info.run_id != before["retrain"]
    assert new_retrain.data.tags["source_run_id"] == before["overfit"]
    assert study.top_level("deepen")[0].data.tags["source_run_id"] == new_retrain.info.run_id


def test_tune_lr_sweep_makes_nested_children_and_picks_the_best(study):
    parent = stage_run(study, "baseline")
    study.mlflow_run("tune_lr", study.params({"parent_run_id": parent.info.run_id, "lrs": "0.0005,1e-12",
                                              "epochs": "1"}))
    run = study.top_level("tune_lr")[0]
    children = {c.info.run_name: c for c in study.children(run.info.run_id)}
    assert sorted(children) == ["tune_lr lr=0.0005", "tune_lr lr=1e-12"]
    accs = {c.info.run_id: c.data.metrics["best_test_acc"] for c in children.values()}
    assert run.data.metrics["best_test_acc"] == max(accs.values())
    assert accs[run.data.tags["best_child_run_id"]] == max(accs.values())
    assert all(c.data.tags["source_run_id"] == parent.info.run_id for c in children.values())
    # every sweep point starts from the parent's best.pt: at lr 1e-12 the weights stay where they began
    still = best_state(study, children["tune_lr lr=1e-12"].info.run_id)
    assert max_weight_change(still, best_state(study, parent.info.run_id), parent.data.tags["arch"]) < 1e-9


def test_unfinished_parent_and_parent_without_checkpoint_are_refused(study):
    experiment = study.client.get_experiment_by_name("Default").experiment_id
    running = study.client.create_run(experiment).info.run_id
    proc = study.cli("tune_lr", "--parent_run_id", running)
    assert proc.returncode == 2 and f"parent run {running} is RUNNING, not FINISHED" in proc.stderr
    (main,) = [r for r in study.top_level("main")][-1:]
    proc = study.cli("tune_lr", "--parent_run_id", main.info.run_id)
    assert proc.returncode == 2 and "has no checkpoints/best.pt" in proc.stderr
    assert "epoch 1" not in proc.stdout
