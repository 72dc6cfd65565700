"""Faults: SIGKILL and SIGTERM mid-run then resume, parameter validation, concurrent runs."""
import math
import os
import signal
import subprocess

import pytest

from support.processes import Pause
from support.store import PROJECT, TINY, VENV_BIN
from pipeline import models

pytestmark = pytest.mark.e2e


def start_train(store, params, pause=None):
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "train", "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    # a process group of its own, so a signal reaches `mlflow run` and the training child alike
    return subprocess.Popen(cmd, cwd=store.root, env=pause.env(store.env) if pause else store.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def interrupted_then_resumed(store, sig):
    params = store.params({"epochs": "4"})
    pause = Pause(store.root / "pause", "epoch:2")  # held once epoch 2's record is written
    proc = start_train(store, params, pause)
    _, run_id = pause.wait("epoch-2", proc)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    status = store.client.get_run(run_id).info.status
    logged = store.steps(run_id, "test_acc")
    assert logged == [1, 2]
    resumed = store.mlflow_run("train", store.params({"resume_run_id": run_id}))
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("test_acc", "train_loss", "epoch_time_s"):
        assert store.steps(run_id, key) == [1, 2, 3, 4], key  # each epoch exactly once
    assert f"resuming after epoch {max(logged) if len(logged) else 0}" in resumed.stdout + resumed.stderr
    state = store.checkpoint(run_id)
    models.build("resnet").load_state_dict(state)
    # the best epoch survives the interruption: its metrics and its checkpoint (TINY's batches an epoch)
    accs = [m.value for m in sorted(store.client.get_metric_history(run_id, "test_acc"), key=lambda m: m.step)]
    best_epoch = accs.index(max(accs)) + 1
    assert (run.data.metrics["best_test_acc"], run.data.metrics["best_epoch"]) == (max(accs), best_epoch)
    batches = math.ceil(int(TINY["limit_train"]) / int(TINY["bs"]))
    assert int(state["block1.1.num_batches_tracked"]) == batches * best_epoch
    return status, err


def test_sigkill_mid_run_then_resume(store):
    status, _ = interrupted_then_resumed(store, signal.SIGKILL)
    assert status == "RUNNING"  # nobody could mark it: MLflow still shows it running


def test_sigterm_marks_killed_and_says_how_to_resume(store):
    status, err = interrupted_then_resumed(store, signal.SIGTERM)
    assert status == "KILLED"
    assert "resume_run_id=" in err


def test_resuming_a_finished_run_says_there_is_nothing_to_resume(store):
    store.mlflow_run("train", store.params({"epochs": "1"}))
    (run,) = store.top_level("train")
    proc = store.cli("train", "--resume_run_id", run.info.run_id, check=True)
    assert "is FINISHED: nothing to resume" in proc.stdout
    assert store.steps(run.info.run_id, "test_acc") == [1]


@pytest.mark.parametrize("key,value", [("lr", "-1"), ("arch", "alexnet"), ("lrs", "abc"), ("epochs", "0")])
def test_bad_parameters_fail_before_any_training(store, key, value):
    proc = store.cli("train", f"--{key}", value, "--dataset", "synthetic", "--data_dir", str(store.data_dir))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"parameter {key}=" in lines[0]
    assert not store.runs()  # nothing was started, so nothing can be registered or checkpointed


def test_bad_parameter_through_mlflow_run(store):
    proc = store.mlflow_run("train", store.params({"lr": "-1"}), check=False)
    assert proc.returncode != 0
    assert "error: parameter lr=-1.0 is out of range: allowed > 0" in proc.stderr
    (run,) = store.runs()
    assert run.info.status == "FAILED" and not store.artifacts(run.info.run_id)


def test_two_concurrent_runs_on_one_sqlite_store_both_finish(store):
    procs = [start_train(store, store.params({"epochs": "1", "seed": str(seed)})) for seed in (1, 2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    # each failure's own last lines, not a repr that pytest cuts short
    assert [p.returncode for p in procs] == [0, 0], "\n".join(
        f"--- seed {seed}: exit {p.returncode}\n{out[-2000:]}\n{err[-6000:]}"
        for seed, p, (out, err) in zip((1, 2), procs, outputs) if p.returncode)
    runs = store.top_level("train")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
