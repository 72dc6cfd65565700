"""`main`'s reuse rule against a real tracking store, without training: a stage is reused only
when a FINISHED run has its params AND its parent run; a new upstream run makes the rest rerun."""
import mlflow
import pytest

from pipeline import config, data, keys, runtime, tracking, workflow
from pipeline.errors import ConfigError
from pipeline.workflow import CHAIN


def finished_run(store, stage, parameters, start_time):
    """A FINISHED stage run as `main` would find it: tagged with the stage's training_key."""
    params = dict(parameters)
    if not config.load(stage).register:
        params.pop("registered_model", None)
    cfg = config.load(stage, params)
    key = keys.training_key(cfg, data.data_digest(cfg), runtime.of(cfg))
    run_id = store.client.create_run("0", start_time=start_time,
                                     tags={"stage": stage, "training_key": key}).info.run_id
    store.client.log_metric(run_id, "best_test_acc", 50.0)
    holds_weights(store, run_id)
    store.client.set_terminated(run_id, "FINISHED")
    return run_id


def holds_weights(store, run_id):
    """A checkpoints/best.pt, as every finished stage run holds (main hands it to the next stage)."""
    weights = store.root / "best.pt"
    weights.write_bytes(b"weights")
    store.client.log_artifact(run_id, str(weights), "checkpoints")


def chain(store, shared, start_time, first_parent="", stages=CHAIN):
    run_ids, parent = {}, first_parent
    for offset, stage in enumerate(stages):
        run_ids[stage] = finished_run(store, stage, dict(shared, **({"parent_run_id": parent} if parent else {})),
                                      start_time + offset)
        parent = run_ids[stage]
    return run_ids


def test_a_new_upstream_run_makes_main_use_the_runs_made_from_it(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    # a tripwire, not a stand-in: every stage here must be reused, so starting one is the failure
    monkeypatch.setattr(mlflow.projects, "run", lambda *a, **k: pytest.fail(f"main started a stage: {a} {k}"))
    data_params = {"dataset": "synthetic", "data_dir": str(store.data_dir), "synthetic_train": "600",
                   "synthetic_test": "300"}
    shared = {**data_params, "max_epochs": "1"}
    old = chain(store, shared, 1000)
    # overfit ran again (same params and parent, a newer run); retrain and deepen have runs made
    # from that new overfit run, but they are older than the ones made from the first overfit run
    new_overfit = finished_run(store, "overfit", dict(shared, parent_run_id=old["tune_gamma"]), 2000)
    new = chain(store, shared, 500, first_parent=new_overfit, stages=["retrain", "deepen"])
    main_run = store.client.create_run("0").info.run_id
    main_params = {**data_params, "epochs": "1"}
    main_cfg = config.load("main", main_params)
    rows = workflow.main(main_cfg, main_params, main_run, runtime.of(main_cfg))
    used = {row["stage"]: row["run_id"] for row in rows}
    assert [row["stage"] for row in rows] == CHAIN
    assert [used[s] for s in CHAIN[:4]] == [old[s] for s in CHAIN[:4]]
    assert used["overfit"] == new_overfit
    assert (used["retrain"], used["deepen"]) == (new["retrain"], new["deepen"])  # not the stale ones



def test_main_looks_a_stage_up_by_the_code_on_disk_which_the_stages_new_process_runs(store, monkeypatch):
    """A file edited while main runs: its next stage starts a new process, which runs the edited
    code, so main reuses a run of that code, not one of the code main itself started with."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setattr(mlflow.projects, "run", lambda *a, **k: pytest.fail(f"main started a stage: {a} {k}"))
    parameters = {"dataset": "synthetic", "data_dir": str(store.data_dir), "synthetic_train": "600",
                  "synthetic_test": "300", "max_epochs": "1"}
    cfg = config.load("model_selection", parameters)
    resolved = runtime.of(cfg)
    monkeypatch.setattr(keys, "hash_code", lambda: "edited-code")  # on disk now
    monkeypatch.setattr(keys, "code_version", lambda: "started-code")  # what this process runs
    edited = store.client.create_run("0", tags={"stage": "model_selection", "training_key": keys.training_key(
        cfg, data.data_digest(cfg), resolved, code="edited-code")}).info.run_id
    holds_weights(store, edited)
    store.client.set_terminated(edited, "FINISHED")
    assert workflow.run_stage("model_selection", parameters, config.load("main", {}), "0", resolved) == edited


def test_main_runs_a_stage_again_whose_finished_run_lost_its_weights(store, monkeypatch, capsys):
    """Its best.pt deleted: reused, the next stage would stop at its parent on every rerun."""
    from types import SimpleNamespace

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    started = []
    monkeypatch.setattr(mlflow.projects, "run", lambda *a, **k: started.append(k) or SimpleNamespace(run_id="new"))
    parameters = {"dataset": "synthetic", "data_dir": str(store.data_dir), "synthetic_train": "600",
                  "synthetic_test": "300", "max_epochs": "1"}
    lost = finished_run(store, "model_selection", parameters, 1000)
    tracking.delete_artifact(lost, "checkpoints/best.pt")
    resolved = runtime.of(config.load("model_selection", parameters))
    assert workflow.run_stage("model_selection", parameters, config.load("main", {}), "0", resolved) == "new"
    assert len(started) == 1 and started[0]["entry_point"] == "model_selection"
    assert f"[main] model_selection: FINISHED run {lost} has lost its checkpoints/best.pt (deleted?): running the " \
           f"stage again" in capsys.readouterr().out
    assert store.client.get_run(lost).data.tags["training_key"].startswith("superseded-")


def test_main_hands_on_whole_sections_and_autotune_gets_its_study_section(monkeypatch, tmp_path):
    assert set(workflow.SHARED) == {
        "scale", "max_epochs", "max_repeats",  # how big the study is
        "dataset", "data_dir", "verify", "download", "limit_train", "limit_test", "val_split", "data_seed",
        "synthetic_train", "synthetic_test",  # the data
        "device", "data_pipeline", "compile", "precision", "eval_bs", "num_workers", "log_every",  # hardware
        "executor", "ray_address", "cpus_per_trial", "gpus_per_trial", "max_retries",  # where children run
        "patience", "registered_model", "checkpoint_every", "force"}
    assert workflow.stage_overrides({"epochs": "2", "dataset": "synthetic", "eval_bs": "64"}) == \
        {"max_epochs": "2", "dataset": "synthetic", "eval_bs": "64"}
    for given in ({"epochs": "5", "max_epochs": "10"}, {"max_epochs": "10", "epochs": "5"},  # the tighter cap,
                  {"epochs": "5", "max_epochs": "0"}, {"max_epochs": "0", "epochs": "5"}):  # in either order
        assert workflow.stage_overrides(given) == {"max_epochs": "5"}, given
    assert workflow.stage_overrides({"repeats": "2", "max_repeats": "3"}) == {"max_repeats": "2"}
    assert workflow.autotune_overrides({"tuner": "optuna", "n_trials": "3", "optuna_storage": "sqlite:////db/x.db"}) == \
        {"n_trials": "3", "optuna_storage": "sqlite:////db/x.db"}
    with pytest.raises(ConfigError, match="main does not pass 'lr' on to the stages"):
        workflow.stage_overrides({"lr": "0.1"})
    # a relative folder as main's working directory reads it: the stages run in the project's
    monkeypatch.chdir(tmp_path)
    assert workflow.stage_overrides({"data_dir": "digits"}) == {"data_dir": str(tmp_path.resolve() / "digits")}
    assert workflow.autotune_overrides({"tuner": "optuna", "optuna_storage": "sqlite:///study.db"}) == \
        {"optuna_storage": f"sqlite:///{tmp_path.resolve() / 'study.db'}"}
    for kept in ("sqlite:///:memory:", "sqlite:///file:study.db?mode=rwc&uri=true", "postgresql://host/db"):
        assert workflow.autotune_overrides({"tuner": "optuna", "optuna_storage": kept}) == {"optuna_storage": kept}
