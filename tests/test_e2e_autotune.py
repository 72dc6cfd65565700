"""autotune through `mlflow run`: a toy Optuna study whose pruned trials stop early, whose best
trial's checkpoint and values land on the stage run, and that the same command continues without
duplicating a trial. `main -P tuner=optuna` is in test_e2e_stages (it reuses that study's stages)."""
import csv

import optuna
import pytest
import torch
from support.digits import colour_params

from pipeline import config

pytestmark = pytest.mark.e2e

TRIAL_EPOCHS = 3
# log-uniform, from no learning in 3 epochs (0-10% at epoch 1) to the seed's lr; no momentum
LR_RANGE, GAMMA_RANGE = "1e-7,1e-3", "0,0"


def toy_study(store, colour_data, **extra):
    # the colour-coded digits: a good lr learns them in an epoch and a tiny one stays near chance,
    # so pruning and the best trial rest on a margin of tens of points on any CPU (on TINY's
    # synthetic digits 3 epochs of 128 images stay near chance and the order is noise)
    params = colour_params(store, colour_data, "right", {
        "limit_train": "128", "limit_test": "64", "bss": "32", "n_trials": "4",
        "trial_epochs": str(TRIAL_EPOCHS), "init": "scratch",
        # aggressive: every trial after the first may be pruned from epoch 1
        "pruner": "median", "startup_trials": "1", "prune_warmup_epochs": "0",
        "lr_range": LR_RANGE, "gamma_range": GAMMA_RANGE, **extra})
    params.pop("bs")  # bss is the categorical choice
    return params


def load_study(run):
    return optuna.load_study(study_name=run.data.tags["optuna_study"], storage=run.data.tags["optuna_storage"])


def trial_children(store):
    return [r for r in store.runs("tags.stage = 'autotune'") if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def tuned(module_store, colour_data):
    module_store.mlflow_run("autotune", toy_study(module_store, colour_data))
    (run,) = module_store.top_level("autotune")
    return run


def test_trials_are_named_children_and_a_pruned_one_stops_early(module_store, tuned):
    store = module_store
    children = {c.data.tags["trial_number"]: c for c in store.children(tuned.info.run_id)}
    assert sorted(children) == ["0", "1", "2", "3"]
    trials = {t.number: t for t in load_study(tuned).trials}
    pruned = [n for n, c in children.items() if c.data.tags["pruned"] == "true"]
    assert pruned, "the aggressive pruner pruned no trial"
    for number, child in children.items():
        trial = trials[int(number)]
        assert child.info.status == "FINISHED"
        assert child.info.run_name.startswith(f"autotune #{number} lr={autotune_short(trial.params['lr'])} ")
        assert float(child.data.params["lr"]) == trial.params["lr"]  # the child trained the trial's values
        assert int(child.data.params["bs"]) == trial.params["bs"]
        steps = store.steps(child.info.run_id, "test_acc")
        accs = {m.step: m.value for m in store.client.get_metric_history(child.info.run_id, "test_acc")}
        assert trial.intermediate_values == accs  # every epoch reported to Optuna, as logged
        if number in pruned:
            assert trial.state == optuna.trial.TrialState.PRUNED
            assert len(steps) < TRIAL_EPOCHS  # fewer test_acc steps: stopped when pruned
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert steps == [1, 2, 3]
            assert trial.value == child.data.metrics["best_test_acc"]


def autotune_short(value):
    from pipeline.autotune import short

    return short(value)


def test_the_best_trial_checkpoint_and_values_are_on_the_stage_run(module_store, tuned):
    store = module_store
    complete = sorted((c for c in store.children(tuned.info.run_id) if c.data.tags["pruned"] == "false"),
                      key=lambda c: int(c.data.tags["trial_number"]))
    best = max(complete, key=lambda c: c.data.metrics["best_test_acc"])  # a tie: the earliest trial
    assert tuned.data.tags["best_child_run_id"] == best.info.run_id
    assert tuned.data.metrics["best_test_acc"] == best.data.metrics["best_test_acc"]
    ours = store.checkpoint(tuned.info.run_id)
    theirs = store.checkpoint(best.info.run_id)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for name in ("lr", "gamma", "wd", "bs"):
        assert config.parse_value(name, tuned.data.tags[f"best_{name}"]) == \
            config.parse_value(name, best.data.params[name])
    assert tuned.data.tags["best_trial_number"] == best.data.tags["trial_number"]
    plots = store.artifacts(tuned.info.run_id, "plots")
    assert {"plots/optuna_history.png", "plots/optuna_intermediate_values.png"} <= plots
    assert ("plots/optuna_param_importances.png" in plots) == (len(complete) >= 2)
    assert "plots/optuna_parallel_coordinate.png" in plots
    with open(store.download(tuned.info.run_id, "plots/trials.csv")) as table:
        rows = list(csv.DictReader(table))
    trials = load_study(tuned).trials
    assert [int(row["number"]) for row in rows] == [trial.number for trial in trials]
    for row, trial in zip(rows, trials):  # the table is the study, and each row's epochs its child's
        assert row["state"] == trial.state.name and float(row["lr"]) == trial.params["lr"]
        assert int(row["epochs"]) == len(store.steps(row["mlflow_run_id"], "test_acc")) > 0
        child = store.client.get_run(row["mlflow_run_id"])  # trials_from=parent: every trial from the stage's start
        assert row["start_run_id"] == "" and child.data.tags["source_run_id"] == "scratch"
        if row["state"] == "COMPLETE":
            assert float(row["value"]) == store.client.get_run(row["mlflow_run_id"]).data.metrics["best_test_acc"]
    assert tuned.data.tags["optuna_storage"].endswith("mlflow.optuna.db")  # beside the store, not in it


@pytest.fixture(scope="module")
def continued(module_store, tuned, colour_data):
    """The 4-trial study asked for 5: (the stage run, its trial children before, the output)."""
    before = {c.data.tags["trial_number"]: c.info.run_id for c in module_store.children(tuned.info.run_id)}
    proc = module_store.mlflow_run("autotune", toy_study(module_store, colour_data, n_trials="5"))
    (run,) = [r for r in module_store.top_level("autotune") if r.info.run_id != tuned.info.run_id]
    return run, before, proc.stdout + proc.stderr


def test_a_larger_n_trials_continues_the_study_and_trains_only_the_missing_trial(module_store, tuned, continued):
    store = module_store
    run, before, output = continued
    assert "already has 4 finished trials: kept" in output
    assert run.info.status == "FINISHED" and len(load_study(run).trials) == 5
    assert run.data.tags["optuna_study"] == tuned.data.tags["optuna_study"]
    children = {c.data.tags["trial_number"]: c.info.run_id for c in store.children(run.info.run_id)}
    assert sorted(children) == ["0", "1", "2", "3", "4"]  # every trial, under the run holding the result
    assert {n: children[n] for n in before} == before  # the first four: the same runs, not trained again
    assert len(trial_children(store)) == 5 and run.data.tags["best_child_run_id"] in children.values()
    earlier = store.client.get_run(tuned.info.run_id)
    assert earlier.data.tags["continued_in"] == run.info.run_id
    assert earlier.data.tags["training_key"].startswith("superseded-")  # `main` never reuses it now


def test_the_same_command_again_continues_the_study_without_duplicate_trials(module_store, tuned, continued,
                                                                             colour_data):
    store = module_store
    last = continued[0]
    before = {c.info.run_id for c in trial_children(store)}
    proc = store.mlflow_run("autotune", toy_study(store, colour_data, n_trials="5"))
    assert "already has 5 finished trials: kept" in proc.stdout + proc.stderr
    assert {c.info.run_id for c in trial_children(store)} == before  # no child trained again
    again = [r for r in store.top_level("autotune") if r.info.run_id not in (tuned.info.run_id, last.info.run_id)]
    assert len(again) == 1 and again[0].info.status == "FINISHED"
    assert len(load_study(again[0]).trials) == 5
    assert again[0].data.tags["best_child_run_id"] == last.data.tags["best_child_run_id"]
    # the record holds together: the best child, and every trial, are this run's children
    assert {c.info.run_id for c in store.children(again[0].info.run_id)} == before
    assert store.client.get_run(last.info.run_id).data.tags["continued_in"] == again[0].info.run_id
