"""autotune's pieces without training: the search space, run names, where the study is kept and
under which name, the per-epoch pruning hook against real Optuna storage, and retrain taking its
values from an autotune parent in a real tracking store."""
import functools
import pickle

import optuna
import pytest
import torch

from pipeline import autotune, config, lineage, runtime, tuning, workflow
from pipeline.errors import ConfigError, LineageError
from pipeline.runner import RunResult, Stage
from pipeline.train import EpochEnd, EpochResult, History

CPU = runtime.Runtime(torch.device("cpu"), "fp32")


def test_search_space_comes_from_params_autotune_yaml():
    space = tuning.SearchSpace.from_config(config.load("autotune"))
    assert space == tuning.SearchSpace((1e-5, 2e-3), (0.0, 0.9), (1e-6, 1e-3), 1e-5, (64, 128, 256))
    custom = tuning.SearchSpace.from_config(config.load("autotune", {"lr_range": "1e-4,1e-3", "bss": "32"}))
    assert custom.lr == (1e-4, 1e-3) and custom.bs == (32,)


def test_an_empty_or_inverted_range_is_one_line():
    with pytest.raises(ConfigError, match=r"autotune needs a search space: lr_range empty"):
        config.load("autotune", {"lr_range": ""})  # before any run is made
    with pytest.raises(ConfigError, match=r"autotune needs a search space: bss empty"):
        config.load("autotune", {"bss": ""})
    with pytest.raises(ConfigError, match=r"parameter lr_range=0.01,0.001 is out of range: allowed two "
                                          r"numbers 0 < low <= high"):
        config.load("autotune", {"lr_range": "1e-2,1e-3"})
    with pytest.raises(ConfigError, match=r"gamma_range=0.5,1.0 is out of range"):
        config.load("autotune", {"gamma_range": "0.5,1"})
    with pytest.raises(ConfigError, match=r"pruner=asha is out of range: allowed median\|hyperband\|none"):
        config.load("autotune", {"pruner": "asha"})


def test_a_weight_decay_drawn_below_the_floor_trains_as_zero():
    space = tuning.SearchSpace.from_config(config.load("autotune"))
    trial = optuna.trial.FixedTrial({"lr": 3.1e-4, "gamma": 0.5, "wd": 9.9e-6, "bs": 128})
    assert space.suggest(trial) == {"lr": 3.1e-4, "gamma": 0.5, "wd": 0.0, "bs": 128}
    above = optuna.trial.FixedTrial({"lr": 3.1e-4, "gamma": 0.5, "wd": 1e-5, "bs": 128})
    assert space.suggest(above)["wd"] == 1e-5


def test_a_point_is_drawn_as_what_trains_as_it_and_wd_zero_is_the_low_end():
    space = tuning.SearchSpace.from_config(config.load("autotune"))
    point = {"lr": 1e-4, "gamma": 1e-4, "wd": 5e-5, "bs": 128}
    assert space.draw_of(point) == point
    no_decay = space.draw_of(dict(point, wd=0.0))
    assert no_decay == dict(point, wd=1e-6) and space.values(no_decay) == dict(point, wd=0.0)
    assert space.draw_of(dict(point, wd=5e-6)) is None  # in range, but a draw there trains with wd 0
    assert space.draw_of(dict(point, lr=3e-3)) is None and space.draw_of(dict(point, bs=32)) is None
    floored = tuning.SearchSpace((1e-5, 2e-3), (0.0, 0.9), (1e-5, 1e-3), 1e-5, (128,))
    assert floored.draw_of(dict(point, wd=0.0)) is None  # no draw of this space trains with wd 0


def test_a_trial_is_named_by_its_number_and_values():
    values = {"lr": 3.1234e-4, "gamma": 0.5, "wd": 0.0, "bs": 128}
    assert tuning.trial_name(7, values) == "autotune #7 lr=3.1e-4 gamma=0.5 wd=0 bs=128"
    assert tuning.trial_name(0, {"lr": 1e-3, "gamma": 0.123, "wd": 2.55e-5, "bs": 64}) == \
        "autotune #0 lr=1e-3 gamma=0.12 wd=2.5e-5 bs=64"


def test_the_study_is_kept_beside_a_sqlite_store_never_in_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tuning.default_storage(f"sqlite:///{tmp_path}/runs/mlflow.db") == \
        f"sqlite:///{tmp_path}/runs/mlflow.optuna.db"
    assert tuning.default_storage("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.optuna.db"
    assert tuning.default_storage("http://tracking:5000") == f"sqlite:///{tmp_path}/optuna.db"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for spelt in (uri, "sqlite:///mlflow.db", f"sqlite:///{tmp_path}/./runs/../mlflow.db"):  # one file, however spelt
        with pytest.raises(ConfigError, match="is the MLflow tracking database: Optuna needs its own"):
            tuning.storage_url(config.load("autotune", {"optuna_storage": spelt}), uri)
    server_db = "postgresql://mlflow:secret@db:5432/mlflow"
    for spelt in ("postgresql://tuner@db:5432/mlflow", "postgresql://tuner@DB/mlflow"):
        with pytest.raises(ConfigError) as refused:  # whoever logs in, the default port spelt or not
            tuning.storage_url(config.load("autotune", {"optuna_storage": spelt}), server_db)
        assert str(refused.value).startswith(f"optuna_storage={spelt} is the MLflow tracking database")
    assert tuning.same_database("mysql+pymysql://u@db/m", "mysql://v@db:3306/m")
    for other in ("postgresql://tuner@db:5432/optuna", "postgresql://tuner@db:5433/mlflow", "databricks://profile:x"):
        assert not tuning.same_database(other, server_db)
    assert not tuning.same_database("postgresql:///m?host=/run/a", "postgresql:///m?host=/run/b")  # two sockets
    assert tuning.storage_url(config.load("autotune"), "databricks://profile:x") == f"sqlite:///{tmp_path}/optuna.db"
    # a relative file as this directory reads it: a Ray worker runs in its own
    assert tuning.storage_url(config.load("autotune", {"optuna_storage": "sqlite:///other.db"}), uri) == \
        f"sqlite:///{tmp_path}/other.db"
    elsewhere = config.load("autotune", {"executor": "ray", "ray_address": "ray://192.0.2.10:10001"})
    with pytest.raises(ConfigError) as refused:
        tuning.storage_url(elsewhere, "http://tracking:5000")
    assert str(refused.value) == (
        f"executor=ray with ray_address=ray://192.0.2.10:10001 (another machine) needs an Optuna database "
        f"server that every node reaches, but optuna_storage is sqlite:///{tmp_path}/optuna.db: pass "
        f"-P optuna_storage=postgresql://user@host/db (or mysql+pymysql://...), host a name every node reaches "
        f"(not localhost) (README: Scaling out with Ray)")
    for server in ("postgresql://tuner@db:5432/optuna", "postgresql://tuner@/optuna?host=db.example",
                   "postgresql://tuner@/optuna?hostaddr=10.0.0.5"):
        assert tuning.storage_url(elsewhere.replace(optuna_storage=server), "http://tracking:5000") == server
    # a server only this machine reaches: each node would ask its own
    for here in ("postgresql://tuner@127.0.0.1/optuna", "postgresql://tuner@localhost:5432/optuna",
                 "postgresql://tuner@[::1]/optuna", "postgresql:///optuna", "postgresql://tuner@/optuna?host=/run/postgresql",
                 "mysql+pymysql://tuner@db/optuna?unix_socket=/run/mysqld/mysqld.sock", "postgresql://tuner@0.0.0.0/optuna",
                 "postgresql://tuner@/optuna?host=db.example&hostaddr=127.0.0.1"):  # libpq goes to hostaddr
        with pytest.raises(ConfigError, match="needs an Optuna database server that every node reaches"):
            tuning.storage_url(elsewhere.replace(optuna_storage=here), "http://tracking:5000")


def test_a_study_url_with_a_password_or_in_memory_is_refused_in_one_line_that_never_shows_it():
    with pytest.raises(ConfigError) as refused:  # every run would log it: params and config.yaml
        config.load("autotune", {"optuna_storage": "postgresql://tuner:hidden@db/optuna"})
    assert str(refused.value) == (
        "parameter optuna_storage holds a password, which every run would log (its params and config.yaml): "
        "drop it from the URL and give it as the database driver reads it (PostgreSQL: PGPASSWORD or ~/.pgpass); "
        "`mlflow run` logs every -P on the run it makes before this check, so delete that run: `mlflow runs "
        "delete --run-id ID`, then `mlflow gc --backend-store-uri STORE --run-ids ID`")
    # however it is spelt: SQLAlchemy takes # and / in a password unencoded, and ?password=
    for spelt in ("mysql+pymysql://u:p@db/m", "postgresql://u:pa#ss@db/optuna", "postgresql://u:pa/ss@db/optuna",
                  "postgresql://u@db/optuna?password=secret"):
        with pytest.raises(ConfigError, match="holds a password"):
            config.load("main", {"tuner": "optuna", "optuna_storage": spelt})
    assert config.load("autotune", {"optuna_storage": "postgresql://tuner@db/optuna"})  # the user alone passes
    for memory in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:s?mode=memory&uri=true"):
        with pytest.raises(ConfigError) as refused:  # each connection would get a database of its own
            tuning.storage_url(config.load("autotune", {"optuna_storage": memory}), "http://tracking:5000")
        assert str(refused.value) == (
            f"optuna_storage={memory} is a database in memory, which no trial (another connection) shares: "
            f"pass a file (sqlite:///study.db) or a server, or leave it empty")


def test_the_study_name_ignores_n_trials_and_storage_but_not_the_search():
    base = config.load("autotune", {"dataset": "synthetic"})
    name = tuning.study_name(base, "digest", CPU, "0@1")
    assert tuning.study_name(base.replace(n_trials=50, optuna_storage="sqlite:////x.db", trial_batch=4),
                             "digest", CPU, "0@1") == name  # more trials continue the same study
    for changed in (base.replace(trial_epochs=2), base.replace(lr_range=[1e-4, 1e-3]),
                    base.replace(pruner="median"), base.replace(start_from_seed=False),
                    base.replace(parent_run_id="abc")):
        assert tuning.study_name(changed, "digest", CPU, "0@1") != name
    assert tuning.study_name(base, "other data", CPU, "0@1") != name
    assert tuning.study_name(base, "digest", runtime.Runtime(torch.device("cpu"), "bf16"), "0@1") != name
    assert tuning.study_name(base, "digest", CPU, "2@1") != name  # another experiment
    assert tuning.study_name(base, "digest", CPU, "0@2") != name  # another store's experiment 0


def test_a_study_is_its_experiments_own_another_experiment_starts_one_of_its_own(store, monkeypatch):
    """Two experiments of one store share the default study storage (one file beside the store):
    the same autotune stage in another experiment neither continues nor reuses the first's trials."""
    cfg, dataset, stage_run, first = study_of(store, monkeypatch, n_trials="1", trial_epochs="1", pruner="none")
    first.tune()
    (trial,) = first.study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    same = autotune.Tuner(cfg, Stage(store.client.create_run("0").info.run_id, CPU), dataset, lineage.Lineage())
    assert same.name == first.name and len(same.study.trials) == 1  # this experiment: the study continues
    other_experiment = store.client.create_experiment("another")
    other_run = store.client.create_run(other_experiment).info.run_id
    other = autotune.Tuner(cfg, Stage(other_run, CPU), dataset, lineage.Lineage())
    assert other.name != first.name and other.study.trials == []
    assert other.url == first.url  # one storage, two studies
    other.tune()  # trains its own trial, under its own stage run
    (own,) = store.client.search_runs([other_experiment], f"tags.mlflow.parentRunId = '{other_run}'")
    assert own.info.run_id != trial.user_attrs["mlflow_run_id"]
    assert other.study.trials[0].user_attrs["mlflow_run_id"] == own.info.run_id


def epoch(number, test_acc):
    result = EpochResult(number, 1.0, 1.0, 50.0, test_acc, 1.0, 100.0)
    return EpochEnd(result, False, History(), lambda: {})


def test_the_epoch_hook_reports_to_its_trial_and_prunes_with_optunas_pruner(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    done = study.ask()
    for step, value in ((1, 50.0), (2, 60.0), (3, 70.0)):
        done.report(value, step)
    study.tell(done, 70.0)

    def hook_for(trial):
        ref = tuning.TrialRef(url, "s", trial._trial_id, "test", "median", 1, 0, 3)
        make_hook = pickle.loads(pickle.dumps(functools.partial(tuning.epoch_hook, ref)))  # as Ray ships it
        return make_hook()

    behind, ahead = study.ask(), study.ask()
    hook = hook_for(behind)
    assert hook(epoch(1, 40.0)) is True  # below the median of complete trials at step 1 (50)
    assert study.trials[behind.number].intermediate_values == {1: 40.0}
    hook = hook_for(ahead)
    assert hook(epoch(1, 55.0)) is False and hook(epoch(2, 65.0)) is False
    assert hook(epoch(3, 10.0)) is False  # the last epoch: the trial is over and completes
    assert study.trials[ahead.number].intermediate_values == {1: 55.0, 2: 65.0, 3: 10.0}
    validation = tuning.TrialRef(url, "s", ahead._trial_id, "val", "none", 1, 0, 3)
    assert tuning.selection_value(EpochResult(4, 1, 1, 1, 5.0, 1, 1, 1.0, 99.0), validation.selects_on) == 99.0


def test_retrain_takes_its_values_from_an_autotune_parent_and_says_so(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    best = {"best_lr": "0.00031", "best_gamma": "0.5", "best_wd": "0.0", "best_bs": "64"}
    tuned = store.client.create_run("0", tags={"stage": "autotune", **best}).info.run_id
    cfg, sources = lineage.tuned_by_parent(config.load("retrain", {"parent_run_id": tuned}))
    assert (cfg.lr, cfg.gamma, cfg.wd, cfg.bs) == (0.00031, 0.5, 0.0, 64)
    assert sources == {k: f"autotune:{tuned}" for k in ("lr", "gamma", "wd", "bs")}
    given = config.load("retrain", {"parent_run_id": tuned, "lr": "1e-5"})
    cfg, sources = lineage.tuned_by_parent(given, frozenset({"parent_run_id", "lr"}))
    assert (cfg.lr, cfg.bs) == (1e-5, 64) and sources["lr"] == "-P"  # what the user gave wins
    other = store.client.create_run("0", tags={"stage": "overfit", **best}).info.run_id
    seed = config.load("retrain", {"parent_run_id": other})
    assert lineage.tuned_by_parent(seed) == (seed, {})  # only an autotune run hands values on
    unfinished = store.client.create_run("0", tags={"stage": "autotune"}).info.run_id
    with pytest.raises(LineageError, match=f"parent autotune run {unfinished} has no tag best_lr"):
        lineage.tuned_by_parent(config.load("retrain", {"parent_run_id": unfinished}))


def test_retrain_refuses_an_lr_tuned_under_another_schedule_than_it_would_train_it_with(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    best = {"best_lr": "0.00031", "best_gamma": "0.5", "best_wd": "0.0", "best_bs": "64"}
    tuned = store.client.create_run("0", tags={"stage": "autotune", **best}).info.run_id
    store.client.log_param(tuned, "lr_schedule", "cosine")  # a peak rate, which falls each epoch
    with pytest.raises(LineageError) as err:
        lineage.tuned_by_parent(config.load("retrain", {"parent_run_id": tuned}))
    assert str(err.value) == (f"parent autotune run {tuned} tuned lr with lr_schedule=cosine, and retrain would "
                              f"train it with lr_schedule=constant: pass -P lr_schedule=cosine or -P lr=<value> "
                              f"(under main, which passes neither on: set lr_schedule: cosine in params/retrain.yaml)")
    same = config.load("retrain", {"parent_run_id": tuned, "lr_schedule": "cosine"})
    cfg, _ = lineage.tuned_by_parent(same, frozenset({"parent_run_id", "lr_schedule"}))
    assert (cfg.lr, cfg.lr_schedule) == (0.00031, "cosine")
    own_lr = config.load("retrain", {"parent_run_id": tuned, "lr": "1e-5"})
    cfg, _ = lineage.tuned_by_parent(own_lr, frozenset({"parent_run_id", "lr"}))
    assert (cfg.lr, cfg.gamma, cfg.lr_schedule) == (1e-5, 0.5, "constant")


def test_main_refuses_before_any_run_an_autotune_and_a_retrain_under_different_schedules(monkeypatch):
    load = config.load

    def autotune_under_cosine(stage, overrides=None):  # as params/autotune.yaml with lr_schedule: cosine
        cfg = load(stage, overrides)
        return cfg.replace(lr_schedule="cosine") if stage == "autotune" else cfg

    workflow.check_chain("optuna", {"tuner": "optuna"})
    monkeypatch.setattr(workflow.config_mod, "load", autotune_under_cosine)
    workflow.check_chain("seed", {})  # no autotune in the seed's chain
    with pytest.raises(ConfigError) as refused:
        workflow.check_chain("optuna", {"tuner": "optuna"})
    assert str(refused.value) == (
        "autotune would tune lr with lr_schedule=cosine and retrain train it with lr_schedule=constant: set the "
        "same lr_schedule in params/autotune.yaml and params/retrain.yaml (main passes none on)")


def test_main_swaps_the_seed_sweeps_for_autotune_only_with_tuner_optuna():
    assert workflow.CHAINS["optuna"] == ["model_selection", "baseline", "autotune", "retrain", "deepen"]
    assert workflow.CHAINS["seed"] == workflow.CHAIN
    assert workflow.autotune_overrides({"tuner": "optuna", "n_trials": "3", "epochs": "1"}) == {"n_trials": "3"}
    with pytest.raises(ConfigError, match="runs with -P tuner=optuna only"):
        workflow.autotune_overrides({"n_trials": "3"})
    assert workflow.stage_overrides({"tuner": "optuna", "n_trials": "3", "epochs": "1"}) == {"max_epochs": "1"}


def study_of(store, monkeypatch, **extra):
    """(cfg, dataset, stage run id, Tuner) of a 2-trial autotune stage in `store`, nothing trained."""
    from pipeline import data

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    params = store.params({"n_trials": "2", "init": "scratch", "bss": "32", **extra})
    params.pop("bs")
    cfg = config.load("autotune", params)
    dataset = data.load(cfg)
    stage_run = store.client.create_run("0").info.run_id
    return cfg, dataset, stage_run, autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())


def test_a_new_study_starts_from_the_seed_chains_point_and_a_continued_one_does_not(store, monkeypatch):
    """Trial 0 of a new study is the seed chain's final point (overfit's lr, gamma, wd, bs); the
    same study continued is not given it again; a point outside the space is not enqueued."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, bss="64,128,256")
    overfit = config.load("overfit")
    first = tuner.study.ask()
    spec = tuner.spec(first)  # the values are drawn here
    assert first.params == {"lr": overfit.lr, "gamma": overfit.gamma, "wd": overfit.wds[0], "bs": overfit.bss[0]}
    assert spec.cfg.lr == overfit.lr and spec.cfg.bs == overfit.bss[0]
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
    assert len(again.study.trials) == 1  # nothing queued a second time
    _, _, _, outside = study_of(store, monkeypatch, bss="32", lr_range="1e-3,2e-3")
    assert outside.study.trials == []


def test_a_seed_point_without_weight_decay_is_enqueued_as_the_draw_that_trains_as_it(store, monkeypatch):
    load = config.load

    def overfit_without_wd(stage, overrides=None):
        cfg = load(stage, overrides)
        return cfg.replace(wds=[0.0]) if stage == "overfit" else cfg

    monkeypatch.setattr(autotune.config_mod, "load", overfit_without_wd)
    _, _, _, tuner = study_of(store, monkeypatch, bss="64,128,256")
    first = tuner.study.ask()
    spec = tuner.spec(first)
    assert first.params["wd"] == 1e-6 and spec.cfg.wd == 0.0  # the range's low end, which trains as 0
    assert first.params["lr"] == config.load("overfit").lr


def test_the_sampler_models_the_parameters_jointly_and_keeps_parallel_trials_apart():
    sampler = tuning.sampler(7, 3)
    assert sampler._multivariate and sampler._constant_liar and sampler._n_startup_trials == 3


def beat(tuner, trial, age_s: int = 0) -> None:
    """The trial's Optuna heartbeat, as its driver last beat it `age_s` seconds ago."""
    import sqlalchemy

    tuner.storage.record_heartbeat(trial._trial_id)
    with tuner.storage.engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, :age) "
                                           "WHERE trial_id = :trial"), {"age": f"-{age_s} seconds", "trial": trial._trial_id})


def child_of(store, stage_run, trial, status="RUNNING") -> str:
    child = store.client.create_run("0", tags={"mlflow.parentRunId": stage_run,
                                               "training_key": trial.user_attrs["child_key"]}).info.run_id
    store.client.log_metric(child, "test_acc", 12.5, step=1)  # logged: epoch 1 has its last.pt
    if status != "RUNNING":
        store.client.set_terminated(child, status)
    return child


STALE = tuning.GRACE_PERIOD_S + 30


def test_a_trial_whose_driver_died_is_retried_by_optunas_heartbeat_and_a_live_one_is_left_alone(store, monkeypatch):
    """The same command run again: a trial whose Optuna heartbeat went stale (its driver died) is
    failed by fail_stale_trials and queued again by the retry callback with its values, its
    reported epochs and its child's name, so the child's key finds the interrupted child run; a
    trial whose driver still beats is left to it."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch)
    dead, live = tuner.study.ask(), tuner.study.ask()
    specs = {trial.number: tuner.spec(trial) for trial in (dead, live)}
    dead.report(12.5, 1)
    dead.report(20.0, 2)  # reported, but its run died before a last.pt covered epoch 2
    children = {trial.number: child_of(store, stage_run, trial) for trial in (dead, live)}
    beat(tuner, dead, age_s=STALE)
    beat(tuner, live)
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())  # a new process's view
    assert again.retry_interrupted() == 1  # the live one
    states = [t.state for t in again.study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING,
                      optuna.trial.TrialState.WAITING]
    retried = again.study.ask()
    assert retried.number == 2 and retried.params == dead.params
    assert again.study.trials[2].intermediate_values == {1: 12.5}  # epoch 2 is trained again
    assert again.study.trials[2].system_attrs["retry_history"] == [0]  # a crash: counted
    # Optuna's verdict ends the dead driver's child run, so the retry resumes it on any node
    assert store.client.get_run(children[dead.number]).info.status == "FAILED"
    assert store.client.get_run(children[live.number]).info.status == "RUNNING"
    spec = again.spec(retried)
    assert spec.name == specs[dead.number].name and spec.name.startswith("autotune #0 ")
    assert retried.user_attrs["child_key"] == dead.user_attrs["child_key"]  # finds the child run again
    assert spec.cfg == specs[dead.number].cfg


def test_a_study_whose_every_trial_is_another_drivers_says_so_not_that_checkpoints_are_gone(store, monkeypatch):
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, n_trials="1")
    theirs = tuner.study.ask()
    tuner.spec(theirs)
    child_of(store, stage_run, theirs)
    beat(tuner, theirs)  # their driver beats: the trial is left to it, and nothing is asked here
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
    with pytest.raises(LineageError) as err:
        again.tune()
    assert str(err.value) == (
        f"no trial of study {again.name} has finished here: 1 in flight from another driver; wait for that "
        f"driver and run again, or, if it is gone, run again after Optuna's 60 s grace period or with -P force=true")


def test_a_study_with_a_trial_in_flight_from_another_driver_does_not_finish_without_it(store, monkeypatch):
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch)
    mine, theirs = tuner.study.ask(), tuner.study.ask()
    for trial in (mine, theirs):
        tuner.spec(trial)
    child = child_of(store, stage_run, mine, status="FINISHED")
    mine.set_user_attr("mlflow_run_id", child)
    tuner.study.tell(mine, 40.0)
    child_of(store, stage_run, theirs)
    beat(tuner, theirs)  # their driver beats it: 1 finished + 1 in flight = n_trials, nothing to ask
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
    monkeypatch.setattr(autotune.runner, "result_from_record", lambda run_id, arch: run_id)
    with pytest.raises(LineageError) as err:
        again.tune()
    assert str(err.value) == (
        f"study {again.name} has 1 trials in flight from another driver, which this run would choose without: "
        f"wait for that driver and run again (its 1 finished trials are kept), or, if it is gone, run again after "
        f"Optuna's 60 s grace period or with -P force=true")
    assert "best_child_run_id" not in store.client.get_run(stage_run).data.tags


def test_a_trial_whose_child_run_was_deleted_for_good_is_passed_over(store, monkeypatch, capsys):
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch)
    trial = tuner.study.ask()
    trial.set_user_attr("mlflow_run_id", "f" * 32)  # its child run purged since (`mlflow gc`)
    tuner.study.tell(trial, 50.0)
    assert tuner.earlier_results() == {} and tuner.incumbent() == ""  # every later command went on failing
    out = capsys.readouterr().out
    assert out.count(f"autotune: trial #0 ({'f' * 32}) is gone from the store (deleted for good): passed over") == 2
    # the same study (n_trials is not in its name) asked for one trial, which it holds: nothing is asked
    one = autotune.Tuner(cfg.replace(n_trials=1), Stage(stage_run, CPU), dataset, lineage.Lineage())
    with pytest.raises(LineageError) as err:
        one.tune()
    assert str(err.value) == (
        f"no trial of study {one.name} is left to choose from (1 finished, their runs gone from the store; 0 "
        f"failed): raise -P n_trials, so that new trials train new children, or pass another -P optuna_storage")
    # trials to spare, but the epoch budget is spent (the purged trial trained one epoch): n_trials cannot help
    spent = autotune.Tuner(cfg.replace(n_trials=10, epoch_budget=cfg.trial_epochs), Stage(stage_run, CPU), dataset,
                           lineage.Lineage())
    spent.study.add_trial(optuna.create_trial(params=trial.params, distributions=trial.distributions, value=40.0,
                                              intermediate_values={1: 40.0}, user_attrs={"mlflow_run_id": "e" * 32}))
    with pytest.raises(LineageError, match=r"\(2 finished, their runs gone from the store; 0 failed\): raise "
                                           r"-P epoch_budget, so that new trials"):
        spent.tune()


def test_a_trial_whose_child_run_was_deleted_in_the_ui_is_passed_over_not_moved(store, monkeypatch, capsys):
    cfg, dataset, earlier_run, tuner = study_of(store, monkeypatch)
    kept, deleted = tuner.study.ask(), tuner.study.ask()
    children = {}
    for trial, value in ((kept, 40.0), (deleted, 50.0)):
        tuner.spec(trial)
        children[trial.number] = child_of(store, earlier_run, trial, status="FINISHED")
        trial.set_user_attr("mlflow_run_id", children[trial.number])
        tuner.study.tell(trial, value)
    store.client.delete_run(children[deleted.number])  # in the UI, not `mlflow gc`: MLflow will not move it
    later_run = store.client.create_run("0").info.run_id  # the same command again, continuing the study
    again = autotune.Tuner(cfg, Stage(later_run, CPU, frozenset({earlier_run})), dataset, lineage.Lineage())
    monkeypatch.setattr(autotune.runner, "result_from_record", lambda run_id, arch: run_id)
    assert again.earlier_results() == {kept.number: children[kept.number]}
    assert store.client.get_run(children[kept.number]).data.tags["mlflow.parentRunId"] == later_run
    assert f"autotune: trial #1 ({children[deleted.number]}) was deleted: passed over" in capsys.readouterr().out


def test_a_study_continued_with_fewer_trials_or_epochs_than_it_spent_is_refused_before_it_asks_for_more(
        store, monkeypatch):
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, n_trials="3")
    for value in (40.0, 50.0, 45.0):  # three finished trials of two epochs each
        trial = tuner.study.ask()
        tuner.spec(trial)
        trial.report(value - 5, 1)
        trial.report(value, 2)
        tuner.study.tell(trial, value)
    fewer = autotune.Tuner(cfg.replace(n_trials=2), Stage(stage_run, CPU), dataset, lineage.Lineage())
    with pytest.raises(ConfigError) as refused:  # it would pick the best of 3 as a study of 2
        fewer.tune()
    assert str(refused.value) == (
        f"study {fewer.name} already has 3 finished trials, more than -P n_trials=2: pass -P n_trials=3 or "
        f"more to continue it, or another -P optuna_storage for a new study")
    assert len(fewer.study.trials) == 3  # nothing asked
    # a fourth trial, whose command was stopped after 2 epochs: its epochs count once it is retried
    stopped = tuner.study.ask()
    tuner.spec(stopped)
    stopped.report(30.0, 1)
    stopped.report(35.0, 2)
    child_of(store, stage_run, stopped, status="KILLED")
    tighter = autotune.Tuner(cfg.replace(epoch_budget=7), Stage(stage_run, CPU), dataset, lineage.Lineage())
    with pytest.raises(ConfigError, match=r"already trained 8 epochs, more than -P epoch_budget=7: pass "
                                          r"-P epoch_budget=8 or more \(or 0\)"):
        tighter.tune()


def test_a_retry_whose_start_run_was_deleted_for_good_is_start_gone(store, monkeypatch):
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, trials_from="best")
    trial = tuner.study.ask()
    trial.set_user_attr("start_run_id", "f" * 32)  # chosen when first asked; that run purged since
    with pytest.raises(autotune.StartGone) as err:  # tune fails it, and the study goes on
        tuner.start_of(trial)
    assert str(err.value) == f"autotune: trial #0 starts from run {'f' * 32}'s checkpoints/best.pt, which is gone (deleted?)"


def test_a_trial_that_keeps_killing_its_driver_is_given_up_after_max_retries(store, monkeypatch):
    """With max_retries=1 a stale trial is queued again once; when its retry goes stale too, it
    is failed for good (its child run FAILED), not queued a third time."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, max_retries="1")
    trial = tuner.study.ask()
    tuner.spec(trial)
    child = child_of(store, stage_run, trial)
    beat(tuner, trial, age_s=STALE)
    State = optuna.trial.TrialState
    for attempt in range(2):  # each time the same command is run again, the trial has died again
        again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
        assert again.retry_interrupted() == 0
        if attempt == 0:
            assert [t.state for t in again.study.trials] == [State.FAIL, State.WAITING]
            retried = again.study.ask()  # the retry starts, and its driver dies too
            assert again.spec(retried).name.startswith("autotune #0 ") and retried.params == trial.params
            beat(again, retried, age_s=STALE)
    assert [t.state for t in again.study.trials] == [State.FAIL, State.FAIL]  # not queued a third time
    assert store.client.get_run(child).info.status == "FAILED"


def test_a_trial_whose_child_the_stage_failed_is_retried_as_a_crash_at_once(store, monkeypatch):
    """A child whose worker died for good (Ray gave up, the stage FAILED it): retried with a retry
    counted, without waiting for its heartbeat to go stale."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch)
    trial = tuner.study.ask()
    tuner.spec(trial)
    child_of(store, stage_run, trial, status="FAILED")
    beat(tuner, trial)  # its driver stopped a moment ago
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
    assert again.retry_interrupted() == 0
    State = optuna.trial.TrialState
    assert [t.state for t in again.study.trials] == [State.FAIL, State.WAITING]
    assert again.study.trials[1].system_attrs["retry_history"] == [0]


def test_the_driver_beats_for_its_trial_in_flight_and_stops_when_it_stops(store, monkeypatch):
    """While a trial trains, its Optuna heartbeat is fresh; a stopped driver leaves no heartbeat
    thread behind and the trial's heartbeat goes quiet."""
    import sqlalchemy
    import threading

    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, trial_epochs="2")
    seen = {}

    def hook_that_stops(ref):
        with tuner.storage.engine.connect() as connection:
            seen["heartbeats"] = connection.execute(sqlalchemy.text(
                "SELECT trial_id FROM trial_heartbeats WHERE heartbeat > datetime('now', '-30 seconds')")).all()

        def stop(end):
            raise KeyboardInterrupt

        return stop

    monkeypatch.setattr(autotune, "epoch_hook", hook_that_stops)
    with pytest.raises(KeyboardInterrupt):
        tuner.tune()
    (trial,) = tuner.study.trials
    assert seen["heartbeats"] == [(trial._trial_id,)]
    assert not [t for t in threading.enumerate() if t.name == "optuna-heartbeats"]


def test_another_drivers_trial_that_goes_stale_mid_run_is_taken_over(store, monkeypatch):
    """As study.optimize does, the driver fails stale trials before each ask: a trial whose other
    driver dies while this one trains is retried here, and the study ends at n_trials."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, trial_epochs="1")
    theirs = tuner.study.ask()
    tuner.spec(theirs)
    beat(tuner, theirs)  # live when this driver starts
    real_hook = autotune.epoch_hook

    def their_driver_dies(ref):
        beat(tuner, theirs, age_s=STALE)
        return real_hook(ref)

    monkeypatch.setattr(autotune, "epoch_hook", their_driver_dies)
    tuner.tune()
    State = optuna.trial.TrialState
    trials = tuner.study.trials
    assert [t.state for t in trials] == [State.FAIL, State.COMPLETE, State.COMPLETE]
    assert trials[2].params == theirs.params and trials[2].system_attrs["failed_trial"] == theirs.number


def test_a_trial_stopped_before_its_child_existed_is_queued_again_not_left_to_look_like_another_drivers(
        store, monkeypatch):
    """Ctrl-C between the ask and the child's run (or a sibling's failure on Ray): the trial is
    queued again with its values at once, so the same command run straight after has no trial
    "in flight from another driver" to wait for."""
    from pipeline import executor

    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch)

    def stopped_before_the_child(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "train_child", stopped_before_the_child)
    with pytest.raises(KeyboardInterrupt):
        tuner.tune()
    State = optuna.trial.TrialState
    first, queued = tuner.study.trials
    assert (first.state, queued.state) == (State.FAIL, State.WAITING)
    assert queued.params == first.params and queued.system_attrs.get("retry_history", []) == []
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
    assert again.retry_interrupted() == 0  # nothing live elsewhere


def test_a_trial_whose_command_was_stopped_is_queued_again_without_counting_a_retry(store, monkeypatch):
    """A stopped command (Ctrl-C, SIGTERM) leaves its trial RUNNING and the trial's child KILLED:
    that is no crash, so however often it happens the trial is queued again with its values, and
    max_retries (for workers that die) is never spent on it."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, max_retries="1")
    trial = tuner.study.ask()
    tuner.spec(trial)
    child = child_of(store, stage_run, trial, status="KILLED")  # what a stopped command's cleanup marks
    beat(tuner, trial)  # its driver beat a moment before it was stopped
    trial.report(12.5, 1)
    State = optuna.trial.TrialState
    for stop in range(4):  # stopped four times over, with max_retries=1
        again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
        assert again.retry_interrupted() == 0
        assert [t.state for t in again.study.trials][-1] == State.WAITING, stop
        queued = again.study.trials[-1]
        assert queued.params == trial.params and queued.intermediate_values == {1: 12.5}
        assert queued.system_attrs.get("retry_history", []) == []  # no retry counted
        resumed = again.study.ask()  # the next command takes it up, and is stopped too
        assert again.spec(resumed).name.startswith("autotune #0 ")
        assert resumed.user_attrs["child_key"] == trial.user_attrs["child_key"]  # resumes the same child
    assert store.client.get_run(child).info.status == "KILLED"  # never given up as FAILED


def test_a_trial_whose_child_finished_before_it_was_told_is_recorded_from_its_run(store, monkeypatch):
    """A command stopped between a child's end and telling Optuna: the trial is recorded from the
    child's run (COMPLETE, with its best figure), not retried, and no retry is spent."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, trial_epochs="2")
    trial = tuner.study.ask()
    tuner.spec(trial)
    child = store.client.create_run("0", tags={"mlflow.parentRunId": stage_run, "selected_on": "test",
                                               "training_key": trial.user_attrs["child_key"]}).info.run_id
    for step, acc in ((1, 30.0), (2, 45.0)):
        store.client.log_metric(child, "test_acc", acc, step=step)
    for key, value in (("best_test_acc", 45.0), ("best_epoch", 2), ("test_acc_at_best", 45.0)):
        store.client.log_metric(child, key, value)
    store.client.set_terminated(child, "FINISHED")
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
    assert again.retry_interrupted() == 0
    (recorded,) = again.study.trials
    assert recorded.state == optuna.trial.TrialState.COMPLETE and recorded.value == 45.0
    assert recorded.intermediate_values == {1: 30.0, 2: 45.0} and recorded.user_attrs["mlflow_run_id"] == child


@pytest.mark.parametrize("budget", ["5", "4"])
def test_an_epoch_budget_stops_asking_before_a_whole_trial_would_pass_it(store, monkeypatch, budget):
    """epoch_budget=5 with trials of 2 epochs: two trials (4 epochs); a third could train 6. A
    budget of exactly two trials (4) trains both."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, trial_epochs="2", n_trials="10",
                                              epoch_budget=budget, pruner="none")
    tuner.tune()
    trials = tuner.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sum(len(t.intermediate_values) for t in trials) == 4
    assert tuning.study_name(cfg, dataset.digest, CPU, "0@1") == tuning.study_name(
        cfg.replace(epoch_budget=0), dataset.digest, CPU, "0@1")


def test_the_epoch_budget_counts_what_every_attempt_trained_itself(store, monkeypatch):
    """A crashed attempt's epochs count (those its retry trains again included), its retry counts
    only the epochs it trained itself, and a trial given up after its retries counts too."""
    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, max_retries="1", trial_epochs="4",
                                              n_trials="10", epoch_budget="16")
    trial = tuner.study.ask()
    tuner.spec(trial)
    child_of(store, stage_run, trial)  # its last.pt covers epoch 1
    for epoch in (1, 2):
        trial.report(50.0, epoch)  # epoch 2 trained and reported; its driver died before last.pt
    beat(tuner, trial, age_s=STALE)
    again = autotune.Tuner(cfg, Stage(stage_run, CPU), dataset, lineage.Lineage())
    assert again.retry_interrupted() == 0
    retried = again.study.ask()
    assert again.study.trials[retried.number].intermediate_values == {1: 50.0}  # what last.pt covers
    for epoch in (2, 3, 4):
        retried.report(60.0, epoch)
    again.study.tell(retried, 60.0)
    assert autotune.epochs_trained(again.study.trials) == 2 + 3
    assert not again.budget_spent(1)  # 5 trained, 4 in flight: one more trial fits 16 (13)
    given_up = optuna.create_trial(state=optuna.trial.TrialState.FAIL, params=trial.params,
                                   distributions=trial.distributions, intermediate_values={1: 40.0})
    again.study.add_trial(given_up)  # a trial that failed for good after one epoch
    assert autotune.epochs_trained(again.study.trials) == 6 and again.budget_spent(2)  # 6 + 8 + 4 > 16
    assert not again.budget_spent(1)


def test_an_epoch_budget_below_one_trial_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"epoch_budget=3 is below trial_epochs=4: no trial could start"):
        config.load("autotune", {"epoch_budget": "3", "trial_epochs": "4"})
    assert config.load("autotune", {"epoch_budget": "4", "trial_epochs": "4"}).epoch_budget == 4


def test_with_trials_from_best_each_trial_starts_from_the_best_complete_trial_so_far(store, monkeypatch):
    """trials_from=best: trial 0 starts from the stage's start (here scratch), each later one from
    the best.pt of the best complete trial when it was asked, and says so in its tags; a retry
    starts where its first attempt did, whatever has become best since."""
    from pipeline import checkpoints

    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, trial_epochs="1", n_trials="3",
                                              pruner="none", trials_from="best")
    tuner.tune()
    trials = tuner.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    child = {t.number: t.user_attrs["mlflow_run_id"] for t in trials}
    for trial in trials:
        earlier = trials[:trial.number]
        expected = max(earlier, key=lambda t: (t.value, -t.number)) if earlier else None
        start = child[expected.number] if expected else ""
        assert trial.user_attrs["start_run_id"] == start
        tags = store.client.get_run(child[trial.number]).data.tags
        assert tags["source_run_id"] == (start or "scratch")
        assert tags.get("init_from") == (f"{start}/{checkpoints.BEST}" if start else None)

    # the start is the best complete trial with a best.pt: the first of equals, not the last told,
    # never a pruned one (its value is unfinished), nor one without a child or whose best.pt is gone
    first = trials[0]

    def told(value, run_id, state=optuna.trial.TrialState.COMPLETE, **attrs):
        tuner.study.add_trial(optuna.trial.create_trial(
            params=first.params, distributions=first.distributions, value=value, state=state,
            user_attrs={"mlflow_run_id": run_id, **attrs} if run_id else {}, intermediate_values={1: value}))

    for value, run_id in ((1000.0, child[0]), (1000.0, child[1]), (999.0, child[2])):
        told(value, run_id)
    told(2000.0, child[1], optuna.trial.TrialState.PRUNED)
    told(3000.0, "")
    told(4000.0, store.client.create_run("0").info.run_id)  # a run without checkpoints/best.pt
    trial = tuner.study.ask()
    spec = tuner.spec(trial)
    weights, other = checkpoints.load_weights(child[0]), checkpoints.load_weights(child[1])
    assert spec.init_source == child[0] and spec.init_state.keys() == weights.keys()
    assert all(torch.equal(spec.init_state[k], weights[k]) for k in weights)
    assert not all(torch.equal(spec.init_state[k], other[k]) for k in other)

    # a better trial since: the stopped trial's retry still resumes the child it started
    told(1001.0, child[1])
    autotune.requeue(tuner.study, tuner.fail(tuner.study.trials[trial.number]))
    retried = tuner.study.ask()
    assert retried.params == trial.params
    again = tuner.spec(retried)
    assert again.init_source == child[0] and again.init_state is spec.init_state  # read once, shared
    assert retried.user_attrs["child_key"] == trial.user_attrs["child_key"]
    assert tuner.spec(tuner.study.ask()).init_source == child[1]  # a new trial: the new best

    # a trial whose best epoch diverged (NaN weights, digit 0's share as its value) is marked so
    # when told, and never a start
    diverged = History()
    diverged.add(EpochResult(1, float("nan"), float("nan"), 10.0, 19.0, 1.0, 100.0))
    diverged.diverged = True
    trial = tuner.study.ask()
    tuner.cfg = tuner.cfg.replace(trial_epochs=3)  # it stopped short of them on its own: not pruned
    tuner.record(trial, RunResult(child[2], "x", "resnet", 19.0, 1, diverged, "test", 19.0))
    assert tuner.study.trials[trial.number].state == optuna.trial.TrialState.COMPLETE
    assert tuner.study.trials[trial.number].user_attrs["diverged"] is True
    told(5000.0, child[2], diverged=True)
    assert tuner.spec(tuner.study.ask()).init_source == child[1]


def test_trials_from_is_parent_or_best_and_names_another_study():
    cfg = config.load("autotune", {"trials_from": "best"})
    with pytest.raises(ConfigError, match=r"trials_from.*parent\|best"):
        config.load("autotune", {"trials_from": "incumbent"})
    assert tuning.study_name(cfg, "d", CPU, "0@1") != tuning.study_name(cfg.replace(trials_from="parent"), "d", CPU,
                                                                      "0@1")
    assert "trials_from" in workflow.autotune_overrides({"tuner": "optuna", "trials_from": "best"})


def test_a_trial_whose_start_lost_its_best_pt_is_failed_unless_its_child_needs_no_start(store, monkeypatch, capsys):
    """trials_from=best, a start run whose best.pt is gone since its trials were first asked: the
    retry of a trial whose child FINISHED reuses that child (the start's weights are never read);
    a trial that would train from the start is failed for good with one line, and a new trial
    takes its place, started from the best complete trial that still has a best.pt."""
    from pipeline import checkpoints, tracking

    cfg, dataset, stage_run, tuner = study_of(store, monkeypatch, trial_epochs="1", n_trials="2",
                                              pruner="none", trials_from="best")
    tuner.tune()
    first, second = tuner.study.trials
    gone = second.user_attrs["start_run_id"]  # trial 0's child, the start of trial 1
    assert gone == first.user_attrs["mlflow_run_id"]
    present = tracking.has_artifact  # the store says it has no best.pt (aggregate may still read it)
    monkeypatch.setattr(tracking, "has_artifact", lambda run_id, path: run_id != gone and present(run_id, path))
    autotune.requeue(tuner.study, second)  # trial 1 retried, as Optuna's retry callback queues it
    tuner.study.add_trial(optuna.trial.create_trial(  # a trial that was asked and never started
        state=optuna.trial.TrialState.WAITING, params=second.params, distributions=second.distributions,
        user_attrs={"start_run_id": gone}))
    capsys.readouterr()
    tuner = autotune.Tuner(cfg.replace(n_trials=4), Stage(stage_run, CPU), dataset, lineage.Lineage())  # a new command
    tuner.tune()
    out = capsys.readouterr().out
    trials = tuner.study.trials
    states = optuna.trial.TrialState
    assert [t.state for t in trials[2:]] == [states.COMPLETE, states.FAIL, states.COMPLETE]
    assert trials[2].user_attrs["mlflow_run_id"] == second.user_attrs["mlflow_run_id"]  # reused as it was
    assert trials[2].value == second.value
    assert f"autotune: trial #3 starts from run {gone}'s {checkpoints.BEST}, which is gone (deleted?): failed, " \
           f"a new trial takes its place" in out
    assert "trial #1 starts from" not in out
    started = trials[4].user_attrs["start_run_id"]  # the best complete trial that has a best.pt
    assert started == second.user_attrs["mlflow_run_id"] != gone
    assert store.client.get_run(trials[4].user_attrs["mlflow_run_id"]).data.tags["source_run_id"] == started
