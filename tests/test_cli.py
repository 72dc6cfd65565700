"""The CLI (`python -m pipeline`): every refusal is one line with its exit code, and a command
whose runs were stopped on an error's way up says how to continue them."""
import io
import os
import sqlite3
import sys

import optuna
import pytest
from mlflow.exceptions import MlflowException

from pipeline import __main__ as cli
from pipeline import config, interrupts, session
from pipeline.errors import ChildFailed, ConfigError, first_line


def test_a_user_error_is_one_line_with_its_exit_code(monkeypatch, capsys):
    assert cli.main(["train", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: parameter epochs=0 is out of range: allowed >= 1; fix it with -P epochs=<value>"]
    assert cli.main(["train", "--data-dir", "a", "--data_dir=b"]) == 2  # one spelling or the other: neither wins
    assert capsys.readouterr().err.splitlines() == ["error: parameter data_dir given twice (a and b): give it once"]
    monkeypatch.setattr(session, "run", lambda cfg, given: (_ for _ in ()).throw(ChildFailed("child 'x' failed")))
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: child 'x' failed"]

    def failed_beside_siblings(cfg, given):  # the Ray driver stopped the children in flight with it
        err = ChildFailed("child 'x' failed: ValueError: boom")
        interrupts.killed_runs(err).extend(["child-y"])
        raise err

    monkeypatch.delenv("SVHN_MAIN_RUN_ID", raising=False)
    monkeypatch.setattr(session, "run", failed_beside_siblings)
    assert cli.main(["tune_lr", "--lrs", "0.001,0.002"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: child 'x' failed: ValueError: boom" and len(err) == 2
    assert err[1].startswith("runs child-y marked KILLED;") and err[1].endswith(
        "Continue with the same command: mlflow run . -e tune_lr --env-manager local -P lrs=0.001,0.002")
    assert issubclass(ChildFailed, Exception) and ConfigError.exit_code == 2
    # under `mlflow run --experiment-name svhn-demo`: the same experiment, where reuse looks for runs
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "7")
    assert cli.main(["tune_lr", "--lrs", "0.001,0.002"]) == 1
    assert capsys.readouterr().err.splitlines()[1].endswith(
        "Continue with the same command: mlflow run . -e tune_lr --experiment-id 7 --env-manager local "
        "-P lrs=0.001,0.002")


def test_a_password_in_a_url_never_reaches_an_error_line(monkeypatch, capsys, tmp_path):
    """MLflow quotes the store's URL whole when a request fails, and a refusal of ours may echo a
    -P value as given: the line shows neither password."""
    from support.processes import refusing_port

    with refusing_port() as port:  # nothing listens: the first request fails
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        assert cli.main(["train", "--dataset", "synthetic", "--data_dir", str(tmp_path), "--synthetic_train", "40",
                         "--synthetic_test", "20"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: API request to http://***@127.0.0.1:{port}/api/") and "s3cret" not in line
    assert cli.main(["train", "--optuna_storage", "postgresql://u:s3cret@db/optuna"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: -P optuna_storage=postgresql://u:***@db/optuna would be ignored")


def test_an_artifact_upload_the_server_refuses_is_one_line_without_its_password(monkeypatch, capsys):
    """An upload's HTTPError (a proxy's 413 for a large best.pt) quotes the URL whole: one line, no
    password, no traceback."""
    import requests

    def upload_refused(cfg, given):
        response = requests.Response()
        response.status_code, response.reason = 413, "Request Entity Too Large"
        response.url = "http://alice:s3cret@tracking:5000/api/2.0/mlflow-artifacts/artifacts/1/r/checkpoints/best.pt"
        response.raise_for_status()  # requests' own HTTPError and message

    monkeypatch.delenv("SVHN_MAIN_RUN_ID", raising=False)
    monkeypatch.setattr(session, "run", upload_refused)
    assert cli.main(["train"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("error: 413 Client Error: Request Entity Too Large for url: "
                    "http://***@tracking:5000/api/2.0/mlflow-artifacts/artifacts/1/r/checkpoints/best.pt")


def test_data_that_is_not_there_is_one_line_and_no_run(store, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    nowhere = tmp_path / "nowhere"
    for args in (["train"], ["tune_lr", "--init", "scratch"], ["main"]):
        assert cli.main([*args, "--data_dir", str(nowhere)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: data folder {nowhere} does not exist: ")
    # a folder this user cannot look in (as root, a name too long stands for "permission denied")
    unusable = tmp_path / ("x" * 300)
    for args in (["train"], ["main", "--dataset", "synthetic"], ["tune_lr", "--init", "scratch", "--dataset", "svhn"]):
        assert cli.main([*args, "--data_dir", str(unusable)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: cannot look in {unusable}") and line.endswith("(File name too long): pass a shorter -P data_dir")
    assert store.runs() == []


def test_compile_without_a_cpp_compiler_is_one_line_and_no_run(store, monkeypatch, capsys, tmp_path):
    """Inductor finds no working C++ compiler (none at the path it is told): refused before any run,
    where the first training step would have failed with a traceback inside one."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # inductor's own patch: monkeypatch would delete the setting on undo (it is no plain attribute)
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-g++"),)}):
        for stage in ("train", "main"):
            assert cli.main([stage, "--compile", "true", "--device", "cpu", "--dataset", "synthetic",
                             "--data_dir", str(tmp_path)]) == 2
            (line,) = capsys.readouterr().err.splitlines()
            assert line == ("error: -P compile=true needs a C++ compiler on CPU, and none works here "
                            "(InvalidCxxCompiler): install g++ (or set CXX to one), or pass -P compile=false")
    # a compiler, and no Python.h where inductor looks for it
    import sysconfig

    real_get_path = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path) if name == "include"
                        else real_get_path(name, *a, **k))
    assert cli.main(["train", "--compile", "max-autotune-no-cudagraphs", "--device", "cpu", "--dataset", "synthetic",
                     "--data_dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"error: -P compile=max-autotune-no-cudagraphs needs Python's C headers on CPU, and {tmp_path}/"
                    f"Python.h is not there: install them (python3-dev, or your Python's -dev package), or pass "
                    f"-P compile=false")
    assert store.runs() == []


def test_a_line_naming_a_file_whose_name_is_not_utf8_is_written_escaped_where_stdout_is_strict(monkeypatch):
    """Under en_US.UTF-8 (not C), stdout refuses the surrogate that stands for byte 0xe9 in a
    Latin-1 file name: the line is written with \\udce9, not a UnicodeEncodeError traceback."""
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", strict)
    name = os.fsdecode(b"caf\xe9.png")  # as os.listdir gives it: 0xe9 as the surrogate \udce9
    monkeypatch.setattr(session, "run", lambda cfg, given: print(f"cannot read image {name}"))
    assert cli.main(["train"]) == 0
    strict.flush()
    assert strict.buffer.getvalue() == b"cannot read image caf\\udce9.png\n"


def test_an_error_that_stopped_runs_prints_the_command_that_continues_them(monkeypatch, capsys):
    def server_gone(cfg, given):
        err = MlflowException("API request to http://tracking:5000/api/2.0/mlflow/runs/get failed")
        interrupts.killed_runs(err).extend(["child-a", "child-b"])  # what the Ray driver marked KILLED
        raise err

    monkeypatch.delenv("SVHN_MAIN_RUN_ID", raising=False)
    monkeypatch.setattr(session, "run", server_gone)
    assert cli.main(["tune_lr", "--lrs", "0.001", "--log_every", "7"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: API request to http://tracking:5000")
    assert err[1].startswith("runs child-a, child-b marked KILLED;")
    assert err[1].endswith("Continue with the same command: "
                           "mlflow run . -e tune_lr --env-manager local -P lrs=0.001 -P log_every=7")


def test_a_bug_that_stopped_runs_says_so_before_its_traceback(monkeypatch, capsys):
    def bug(cfg, given):
        err = KeyError("oops")
        interrupts.killed_runs(err).append("child-a")
        raise err

    monkeypatch.delenv("SVHN_MAIN_RUN_ID", raising=False)
    monkeypatch.setattr(session, "run", bug)
    with pytest.raises(KeyError):
        cli.main(["train"])
    assert "runs child-a marked KILLED" in capsys.readouterr().err


def test_main_stopped_by_a_failed_stage_prints_the_command_that_continues_it(store, monkeypatch, capsys):
    from mlflow.exceptions import ExecutionException

    from pipeline import workflow

    def a_stage_failed(cfg, overrides, run_id, resolved):
        raise ExecutionException("Run (ID 'abc') failed")  # what mlflow.projects.run raises

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("SVHN_MAIN_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setattr(workflow, "main", a_stage_failed)
    assert cli.main(["main", "--dataset", "synthetic"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: Run (ID 'abc') failed"
    assert err[1].startswith("main stopped;") and err[1].endswith(
        "Continue with the same command: mlflow run . -e main --env-manager local -P dataset=synthetic")
    (run,) = store.runs()
    assert run.info.status == "FAILED"


def test_main_refuses_what_it_cannot_hand_its_stages_before_its_run_exists(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    for args, line in ((["--lr", "0.1"], "main does not pass 'lr' on to the stages: set it in params/<stage>.yaml "
                                         "or run that stage alone with -P lr=..."),
                       (["--n_trials", "3"], "main passes n_trials to the autotune stage, which runs with "
                                             "-P tuner=optuna only: add it, or drop n_trials"),
                       (["--tuner", "optuna", "--epochs", "2", "--trial_epochs", "5"],
                        "-P trial_epochs=5 with -P epochs=2: main caps every stage at 2 epochs, so trial_epochs "
                        "would be 2 while its param reads 5; pass -P trial_epochs=2, or raise -P epochs"),
                       (["--resume_run_id", "abc"], "main continues by itself: run the same main command again "
                        "(finished stages are reused, a stopped one resumed); -P resume_run_id continues one "
                        "stage's run alone"),
                       # a trial at the demo scale is 2 epochs (params/scale_demo.yaml), not the default 10
                       (["--tuner", "optuna", "--scale", "demo", "--epoch_budget", "1"],
                        "epoch_budget=1 is below trial_epochs=2: no trial could start; raise it to at least 2, "
                        "or 0 for no budget")):
        assert cli.main(["main", *args]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {line}"]
    assert store.runs() == []  # no FAILED main run left behind
    load = config.load  # as params/autotune.yaml with lr_schedule: cosine and params/retrain.yaml without
    monkeypatch.setattr(config, "load", lambda stage, overrides=None: load(stage, overrides).replace(
        lr_schedule="cosine") if stage == "autotune" else load(stage, overrides))
    assert cli.main(["main", "--tuner", "optuna"]) == 2
    assert capsys.readouterr().err.splitlines()[0].startswith("error: autotune would tune lr with lr_schedule=cosine")
    assert store.runs() == []
    monkeypatch.setattr(config, "load", load)
    # what the autotune stage accepts, main accepts: 6 epochs hold 3 trials of 2
    assert config.load("main", {"tuner": "optuna", "scale": "demo", "epoch_budget": "6"}).epoch_budget == 6
    assert config.load("autotune", {"scale": "demo", "epoch_budget": "6"}).trial_epochs == 2


def test_a_train_run_stopped_in_its_first_epoch_is_started_again_and_a_later_one_resumed(store, monkeypatch,
                                                                                          capsys, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("SVHN_MAIN_RUN_ID", raising=False)
    given = {"dataset": "synthetic", "epochs": "3"}

    def hint(run_id):
        stopped = KeyboardInterrupt("SIGINT")
        interrupts.killed_runs(stopped).append(run_id)
        assert cli.interrupted(stopped, "train", dict(given)) == 130
        (line,) = capsys.readouterr().err.splitlines()
        return line

    early = store.client.create_run("0").info.run_id  # no last.pt: resume_run_id would be refused
    assert hint(early).endswith(
        "Start again with the same command: mlflow run . -e train --env-manager local -P dataset=synthetic -P epochs=3")
    later = store.client.create_run("0").info.run_id
    (tmp_path / "last.pt").write_bytes(b"weights")
    store.client.log_artifact(later, str(tmp_path / "last.pt"), "checkpoints")
    assert hint(later).endswith(
        f"Continue with the same command: mlflow run . -e train --env-manager local -P resume_run_id={later}")


def test_an_optuna_storage_that_cannot_be_opened_is_one_line_before_any_run(store, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    nowhere = f"sqlite:///{tmp_path}/no-such-folder/optuna.db"
    assert cli.main(["autotune", "--optuna_storage", nowhere]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot open optuna_storage={nowhere} (OperationalError: (sqlite3.OperationalError) unable to open "
        f"database file): pass a database Optuna can reach, or leave it empty for one beside the tracking store"]
    older = tmp_path / "older.db"  # a study database of another schema version: Optuna raises RuntimeError
    optuna.storages.RDBStorage(f"sqlite:///{older}").engine.dispose()
    with sqlite3.connect(older) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v2.4.0.a'")
    assert cli.main(["autotune", "--optuna_storage", f"sqlite:///{older}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot open optuna_storage=sqlite:///{older} (RuntimeError: The runtime optuna "
                           f"version {optuna.__version__} is no longer compatible with the table schema")
    assert store.runs() == []


def test_an_errors_one_line_report_is_its_first_line_cut_to_the_limit():
    assert first_line(ValueError("\n  no such table: trials\n[SQL: SELECT ...]")) == "no such table: trials"
    assert first_line(ValueError("x" * 300), 200) == "x" * 200 and first_line(ValueError("x" * 300), None) == "x" * 300
    assert first_line(OSError(), None, "OSError") == "OSError" and first_line(ValueError("  ")) == ""


def test_the_entry_imports_with_the_collector_off_and_freezes_what_it_made_then_gives_it_back():
    """python -m pipeline: the imports' lasting objects frozen (never traversed again) and the
    collector on for the run; at exit frozen again, with the code main returned."""
    import gc

    gc.unfreeze()
    try:
        cli.import_without_collecting()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        gc.unfreeze()
        with pytest.raises(SystemExit) as ended:
            cli.exit_with(3)
        assert ended.value.code == 3 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()
