"""session: what a command does around a stage, with the stage itself replaced by a stand-in
(no training): the Stage it hands down, the runs it continues, how it closes the run, what it
withdraws when the stage fails, and what it refuses to resume; in a real temporary store."""
import os

import pytest

from pipeline import config, data, keys, lifecycle, registry, runner, runtime, session, stages
from pipeline.errors import ConfigError, LineageError, TakenOver


@pytest.fixture
def tiny(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = config.load("tune_lr", store.params({"init": "scratch", "epochs": "1", "lrs": "0.001"}))
    return store, cfg


def result(run_id: str) -> runner.RunResult:
    return runner.RunResult(run_id, "stand-in", "resnet", 50.0, 1, None, "test", 40.0)


VERSION = registry.Registered("svhn-classifier-synthetic", "3", "2", created=False)


@pytest.fixture
def withdrawn(monkeypatch) -> list:
    """What the session hands registry.withdraw, call by call."""
    calls = []
    monkeypatch.setattr(registry, "withdraw", lambda registered: calls.append(list(registered)))
    return calls


def test_a_stage_that_fails_after_registering_has_its_versions_withdrawn(tiny, withdrawn, monkeypatch):
    store, cfg = tiny

    def registers_then_fails(cfg, stage, dataset, lineage):
        stage.registered.append(VERSION)
        raise RuntimeError("the stage broke after registering")

    monkeypatch.setitem(stages.STAGES, "tune_lr", registers_then_fails)
    with pytest.raises(RuntimeError, match="broke after registering"):
        session.run(cfg)
    assert withdrawn == [[VERSION]]
    (run,) = store.top_level("tune_lr")
    assert run.info.status == "FAILED" and "training_key" not in run.data.tags  # never reused by main


def test_a_version_the_store_made_before_the_stage_heard_of_it_is_withdrawn_when_the_stage_fails(store, monkeypatch):
    """register_model creates the version, then waits for it to be READY: a signal or an error in
    between reaches the stage before the version is in its list. It is found by the stage run's
    id, withdrawn, and the registered model it created goes with it."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = config.load("retrain", store.params({"init": "scratch", "epochs": "1", "registered_model": "svhn-left"}))

    def interrupted_while_registering(cfg, stage, dataset, lineage):
        client = MlflowClient()
        client.create_registered_model("svhn-left")
        client.create_model_version("svhn-left", f"runs:/{stage.run_id}/model", run_id=stage.run_id,
                                    tags={registry.CREATED_MODEL: "true", registry.CHAMPION_BEFORE: ""})
        raise KeyboardInterrupt  # as it lands in register_model's wait

    monkeypatch.setitem(stages.STAGES, "retrain", interrupted_while_registering)
    with pytest.raises(KeyboardInterrupt):
        session.run(cfg)
    assert store.client.search_model_versions("name = 'svhn-left'") == []
    assert not registry.model_exists("svhn-left")

    def taken_over_after_its_new_writer_registered(cfg, stage, dataset, lineage):
        client = MlflowClient()
        client.create_registered_model("svhn-left")
        client.create_model_version("svhn-left", f"runs:/{stage.run_id}/model", run_id=stage.run_id)
        client.log_param(stage.run_id, f"{lifecycle.CLAIM}1", lifecycle.stamp(pid="999999", start="1"))
        raise TakenOver(f"run {stage.run_id} was taken over", stage.run_id)

    monkeypatch.setitem(stages.STAGES, "retrain", taken_over_after_its_new_writer_registered)
    with pytest.raises(TakenOver):
        session.run(cfg)
    assert [str(v.version) for v in store.client.search_model_versions("name = 'svhn-left'")] == ["1"]  # its writer's


def test_a_stage_whose_closing_tags_fail_has_its_versions_withdrawn(tiny, withdrawn, monkeypatch):
    store, cfg = tiny

    def registers(cfg, stage, dataset, lineage):
        stage.registered.append(VERSION)
        return result(stage.run_id)

    def store_gone(run_id):
        raise OSError("the store went away")

    monkeypatch.setitem(stages.STAGES, "tune_lr", registers)
    monkeypatch.setattr(runner, "finished", store_gone)  # the last of the closing steps
    with pytest.raises(OSError, match="went away"):
        session.run(cfg)
    assert withdrawn == [[VERSION]]
    (run,) = store.top_level("tune_lr")
    assert run.info.status == "FAILED"


def test_a_stage_continues_an_earlier_unfinished_run_of_the_same_key_and_finishes_with_its_key(tiny, monkeypatch):
    store, cfg = tiny
    dataset = data.load(cfg)
    resolved = runtime.of(cfg)
    stage_key = keys.study_key(cfg, dataset.digest, resolved)
    earlier = store.client.create_run("0", tags={"stage": "tune_lr", lifecycle.STAGE_KEY: stage_key}).info.run_id
    other = store.client.create_run("0", tags={"stage": "tune_lr", lifecycle.STAGE_KEY: "another key"}).info.run_id
    handed = []

    def stand_in(cfg, stage, dataset, lineage):
        handed.append(stage)
        return result(stage.run_id)

    monkeypatch.setitem(stages.STAGES, "tune_lr", stand_in)
    session.run(cfg)
    (stage,) = handed
    assert stage.adoptable == frozenset({earlier})  # not the run of another key
    assert (stage.runtime, stage.code_version) == (resolved, keys.code_version())  # resolved once, handed down
    run = store.client.get_run(stage.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["training_key"] == keys.training_key(cfg, dataset.digest, resolved)
    old = store.client.get_run(earlier)
    assert old.data.tags[lifecycle.CONTINUED_IN] == stage.run_id and old.info.status == "KILLED"
    assert [k for k in old.data.params if k.startswith(lifecycle.CLAIM)] == ["writer.1"]  # claimed once
    assert store.client.get_run(other).info.status == "RUNNING"  # left alone


def test_a_finished_run_stays_reusable_until_a_command_continuing_it_finishes(store, monkeypatch):
    """autotune continues its study's finished runs too. A continuation that is refused or fails
    (here the stage raises, as the study's limits refusal does) leaves the finished run's key as
    it was, so `main` still reuses it; once a continuation finishes, that run holds the result."""
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    params = store.params({"init": "scratch", "n_trials": "2", "bss": "64"})
    cfg = config.load("autotune", {k: v for k, v in params.items() if k not in ("bs", "epochs")})
    dataset = data.load(cfg)
    stage_key = keys.study_key(cfg, dataset.digest, runtime.of(cfg))
    key = keys.training_key(cfg, dataset.digest, runtime.of(cfg))
    finished = store.client.create_run("0", tags={"stage": "autotune", lifecycle.STAGE_KEY: stage_key,
                                                  "training_key": key}).info.run_id
    store.client.set_terminated(finished, "FINISHED")

    def refused(cfg, stage, dataset, lineage):
        assert stage.adoptable == frozenset({finished})
        raise ConfigError("study already has 3 finished trials, more than -P n_trials=2")

    monkeypatch.setitem(stages.STAGES, "autotune", refused)
    with pytest.raises(ConfigError):
        session.run(cfg)
    assert tracking.find_finished_run("0", key).info.run_id == finished
    trial = store.client.create_run("0", tags={"mlflow.parentRunId": finished}).info.run_id

    def fails_once_it_took_a_trial(cfg, stage, dataset, lineage):  # the earlier run is not whole now
        runner.adopt(trial, stage.run_id)
        raise RuntimeError("the stage broke")

    monkeypatch.setitem(stages.STAGES, "autotune", fails_once_it_took_a_trial)
    with pytest.raises(RuntimeError):
        session.run(cfg)
    assert tracking.find_finished_run("0", key) is None  # main trains it again: its trial has left it
    assert store.client.get_run(finished).data.tags["training_key"] == f"superseded-{key}"
    monkeypatch.setitem(stages.STAGES, "autotune", lambda cfg, stage, dataset, lineage: result(stage.run_id))
    session.run(cfg)
    now = tracking.find_finished_run("0", key)
    assert now.info.run_id != finished and now.data.tags["stage"] == "autotune"
    assert store.client.get_run(finished).data.tags["training_key"] == f"superseded-{key}"  # once


def test_a_stage_run_is_live_before_it_can_be_found_by_its_key(tiny, monkeypatch):
    """Another command with the same key looks for runs by their stage key: one it finds without
    a live writer it would take over (and end KILLED when it fails), though this one still runs."""
    from mlflow.tracking import MlflowClient

    store, cfg = tiny
    found_by_key = []
    real_set_tag = MlflowClient.set_tag

    def set_tag(self, run_id, key, value, *args, **kwargs):
        real_set_tag(self, run_id, key, value, *args, **kwargs)
        if key == lifecycle.STAGE_KEY:  # what another command would see now: this live process's beat
            tags = store.client.get_run(run_id).data.tags
            found_by_key.append(lifecycle.parse_stamp(tags.get(lifecycle.HEARTBEAT, "")))

    monkeypatch.setattr(MlflowClient, "set_tag", set_tag)
    monkeypatch.setitem(stages.STAGES, "tune_lr", lambda cfg, stage, dataset, lineage: result(stage.run_id))
    session.run(cfg)
    (beat,) = found_by_key
    assert beat is not None and beat["pid"] == str(os.getpid()) and lifecycle.is_mine(beat)


def test_a_command_beats_the_earlier_run_it_continues_and_lets_it_go_when_it_fails(tiny, monkeypatch):
    """While it runs, the earlier run it claimed carries this process's heartbeats (live from any
    machine); once it fails, that run is ended again after the claim, so the same command (from
    any machine) continues it at once."""
    import os
    import time

    store, cfg = tiny
    dataset = data.load(cfg)
    stage_key = keys.study_key(cfg, dataset.digest, runtime.of(cfg))
    earlier = store.client.create_run("0", tags={"stage": "tune_lr", lifecycle.STAGE_KEY: stage_key}).info.run_id
    store.client.set_terminated(earlier, "KILLED")  # an earlier command, stopped
    seen = {}

    def beat_of_earlier():
        return lifecycle.parse_stamp(store.client.get_run(earlier).data.tags.get(lifecycle.HEARTBEAT, ""))

    def breaks(cfg, stage, dataset, lineage):
        seen["claimed"] = lifecycle.claimed_since_it_ended(store.client.get_run(earlier))
        first = beat_of_earlier()
        deadline = time.monotonic() + 30
        while (beat := beat_of_earlier()) == first:  # the heartbeat thread's next beat, however slow
            assert time.monotonic() < deadline, "the earlier run was never beaten while the stage ran"
            time.sleep(0.05)
        seen["heartbeat"] = beat
        raise RuntimeError("the stage broke")

    monkeypatch.setattr(lifecycle, "BEAT_EVERY_S", 0.1)
    monkeypatch.setitem(stages.STAGES, "tune_lr", breaks)
    with pytest.raises(RuntimeError, match="the stage broke"):
        session.run(cfg)
    assert seen["claimed"]["pid"] == seen["heartbeat"]["pid"] == str(os.getpid())
    old = store.client.get_run(earlier)
    assert old.info.status == "KILLED" and lifecycle.latest_claim(old)["pid"] == str(os.getpid())
    assert lifecycle.claimed_since_it_ended(old) is None  # ended again after the claim: free to continue


def test_runs_claimed_before_a_refusal_are_let_go_and_one_another_process_claimed_is_left_to_it(tiny):
    """Two earlier runs to continue: the newer is claimed, the older is live in another process, so
    the command is refused; the newer is ended again after its claim (free at once from anywhere).
    release() never ends a run another process has claimed since."""
    import subprocess
    import sys
    import time

    store, cfg = tiny
    dataset = data.load(cfg)
    stage_key = keys.study_key(cfg, dataset.digest, runtime.of(cfg))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def killed_run(start_time: int) -> str:
            run_id = store.client.create_run("0", start_time=start_time,
                                             tags={"stage": "tune_lr", lifecycle.STAGE_KEY: stage_key}).info.run_id
            store.client.set_terminated(run_id, "KILLED")
            return run_id

        def claimed_by_other(run_id: str) -> None:
            time.sleep(0.01)  # after its end, to the millisecond
            store.client.log_param(run_id, "writer.1", lifecycle.stamp(pid=str(other.pid),
                                                                        start=lifecycle.process_start(other.pid)))

        older, newer = killed_run(1000), killed_run(2000)
        claimed_by_other(older)
        with pytest.raises(LineageError, match=f"run {older} is live"):
            session.run(cfg)
        let_go = store.client.get_run(newer)
        assert lifecycle.is_mine(lifecycle.latest_claim(let_go))  # claimed by this command,
        assert lifecycle.claimed_since_it_ended(let_go) is None  # then ended again after that
        taken = store.client.get_run(older)
        session.release([older])
        assert store.client.get_run(older).info.end_time == taken.info.end_time  # another's: untouched
    finally:
        other.kill()
        other.wait()


def test_resume_refuses_a_continued_run_or_a_main_one_and_leaves_a_finished_one(tiny, capsys):
    from pipeline import tracking

    store, cfg = tiny
    continued = store.client.create_run("0", tags={"stage": "tune_lr", lifecycle.CONTINUED_IN: "newer"}).info.run_id
    with pytest.raises(LineageError, match=f"run {continued} was continued in run newer"):
        session.resume(cfg.replace(resume_run_id=continued))
    done = store.client.create_run("0").info.run_id
    store.client.set_terminated(done, "FINISHED")
    assert session.resume(cfg.replace(resume_run_id=done)) is None
    assert f"run {done} is FINISHED: nothing to resume" in capsys.readouterr().out
    with pytest.raises(LineageError, match="resume run 'nope' was not found"):
        session.resume(cfg.replace(resume_run_id="nope"))
    deleted = store.client.create_run("0", tags={"stage": "tune_lr"}).info.run_id
    tracking.log_config(deleted, cfg)
    store.client.set_terminated(deleted, "KILLED")
    store.client.delete_run(deleted)
    with pytest.raises(LineageError, match=rf"run {deleted} was deleted: restore it \(`mlflow runs restore "):
        session.resume(cfg.replace(resume_run_id=deleted))
    assert store.client.get_run(deleted).info.status == "KILLED"  # nothing written
    # a data -P the run's own dataset (synthetic) never reads: refused against the run's dataset,
    # not the command's default (svhn); the run's own synthetic_train is taken
    synthetic = store.client.create_run("0", tags={"stage": "tune_lr"}).info.run_id
    tracking.log_config(synthetic, cfg)
    store.client.set_terminated(synthetic, "KILLED")
    again = config.load("tune_lr", {"resume_run_id": synthetic, "download": "true"})
    with pytest.raises(ConfigError, match=r"^-P download=true would be ignored: only dataset=svhn reads it, and this "
                                          r"run reads dataset=synthetic"):
        session.resume(again, frozenset({"resume_run_id", "download"}))
    assert store.client.get_run(synthetic).info.status == "KILLED"  # nothing written
    own = config.load("tune_lr", {"resume_run_id": synthetic, "synthetic_train": cfg.synthetic_train})
    assert own.dataset == "svhn"  # the command's default: the run's own dataset decides, in resume
    launcher = store.client.create_run("0").info.run_id  # e.g. `mlflow run`'s own, or predict's
    store.client.set_terminated(launcher, "KILLED")
    with pytest.raises(LineageError, match=f"run {launcher} has no config.yaml: it was not started by a training "
                                           f"stage of this pipeline"):
        session.resume(cfg.replace(resume_run_id=launcher))
    assert store.client.get_run(launcher).info.status == "KILLED"  # nothing written
    main_run = store.client.create_run("0", tags={"stage": "main"}).info.run_id  # with a config.yaml, as main logs
    tracking.log_config(main_run, cfg.replace(stage="main"))
    store.client.set_terminated(main_run, "KILLED")
    with pytest.raises(LineageError, match=f"run {main_run} is a main run, which holds no training of its own: "
                                           f"run main again with the same -P"):
        session.resume(cfg.replace(resume_run_id=main_run))
    assert store.client.get_run(main_run).info.status == "KILLED"


def test_resume_refuses_a_parameter_it_would_ignore_and_takes_one_the_run_has(tiny):
    """`-P lr=...` with resume_run_id would be dropped (a resume continues with the run's own
    config): refused, nothing written; a -P equal to the run's own passes, and so do what never
    changes a result (log_every) and the device as given, which the resume takes."""
    from pipeline import tracking

    store, cfg = tiny
    stopped = store.client.create_run("0", tags={"stage": "tune_lr"}).info.run_id
    tracking.log_config(stopped, cfg)
    store.client.set_terminated(stopped, "KILLED")
    given = frozenset({"resume_run_id", "lr", "lrs", "epochs", "force", "env_manager", "log_every", "device"})
    changed = cfg.replace(resume_run_id=stopped, lr=0.5, lrs=[0.5, 0.1], force=True, log_every=7, device="cpu")
    with pytest.raises(ConfigError) as err:
        session.resume(changed, given)
    assert str(err.value) == (f"run {stopped} resumes with the parameters it started with, not -P lr=0.5 (the run's: "
                              f"{cfg.lr!r}), -P lrs=0.5,0.1 (the run's: 0.001): drop them, or start a new run to "
                              f"train with them")
    assert store.client.get_run(stopped).info.status == "KILLED"  # nothing written
    session.check_resume_params(stopped, cfg, cfg.replace(resume_run_id=stopped, force=True), given)
    # num_workers never changes the tensor pipeline's result, so a resume takes it; under torchvision's
    # DataLoader each worker draws its own crops and rotations: refused there, as the training key says
    session.check_resume_params(stopped, cfg, cfg.replace(num_workers=2), given | {"num_workers"})
    loader = cfg.replace(data_pipeline="torchvision")
    with pytest.raises(ConfigError, match=r"not -P num_workers=2 \(the run's: 0\)"):
        session.check_resume_params(stopped, loader, loader.replace(num_workers=2), given | {"num_workers"})


def test_a_train_run_is_named_after_the_arch_it_trains_its_parents_when_arch_is_empty():
    from pipeline.lineage import Lineage

    cfg = config.load("train", {"arch": "", "lr": "0.01"})
    assert session.run_name(cfg, Lineage(parent_arch="vgg")) == "train vgg lr=0.01"
    assert session.run_name(cfg.replace(arch="resnet2"), Lineage(parent_arch="vgg")) == "train resnet2 lr=0.01"
    assert session.run_name(config.load("tune_lr"), Lineage()) == "tune_lr"
