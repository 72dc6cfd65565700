"""Stop anywhere, continue with one command: a stage killed mid-child, run again, reuses its
finished children, resumes the interrupted one from last.pt, trains the rest; a live run is
never taken over."""
import os
import signal
import subprocess
import time

import pytest

from conftest import PROJECT, VENV_BIN

pytestmark = pytest.mark.e2e

LRS = ["0.002", "0.001", "0.0005"]


def start(store, entry, params, cli=False):
    if cli:
        cmd = [str(VENV_BIN / "python"), "-m", "pipeline", entry]
        for key, value in params.items():
            cmd += [f"--{key}", value]
    else:
        cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", entry, "--env-manager", "local"]
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]
    return subprocess.Popen(cmd, cwd=PROJECT if cli else store.root, env=store.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until(condition, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("timed out")


def child_named(store, name):
    runs = [r for r in store.runs() if r.info.run_name == name]
    return runs[0] if runs else None


def second_child_in_epoch_two(store):
    child = child_named(store, f"tune_lr lr={LRS[1]}")
    return child if child and 1 in store.steps(child.info.run_id, "test_acc") else None


def params(store):
    return store.params({"lrs": ",".join(LRS), "epochs": "3", "init": "scratch"})


def check_continued(store, first_child_id, second_child_id):
    (run,) = [r for r in store.top_level("tune_lr") if r.info.status == "FINISHED"]
    children = {c.info.run_name: c for c in store.children(run.info.run_id)}
    assert set(children) == {f"tune_lr lr={lr}" for lr in LRS}  # three children, none twice
    assert children[f"tune_lr lr={LRS[0]}"].info.run_id == first_child_id  # reused, not retrained
    assert children[f"tune_lr lr={LRS[1]}"].info.run_id == second_child_id  # resumed in place
    for child in children.values():
        assert child.info.status == "FINISHED"
        for key in ("test_acc", "train_loss"):
            assert store.steps(child.info.run_id, key) == [1, 2, 3], (child.info.run_name, key)
        assert "checkpoints/last.pt" not in store.artifacts(child.info.run_id)  # dropped once finished
        assert "checkpoints/best.pt" in store.artifacts(child.info.run_id)
    best = max(children.values(), key=lambda c: c.data.metrics["best_test_acc"])
    assert run.data.tags["best_child_run_id"] == best.info.run_id
    return run


# SIGTERM and the printed command are exercised on `main` itself by tests/test_e2e_stages.py's study.
def test_sigkill_mid_child_then_the_same_command_continues_the_stage(store):
    proc = start(store, "tune_lr", params(store))
    second = wait_until(lambda: second_child_in_epoch_two(store), proc)
    first = child_named(store, f"tune_lr lr={LRS[0]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert store.client.get_run(second.info.run_id).info.status == "RUNNING"  # nobody could mark it
    again = store.mlflow_run("tune_lr", params(store))
    output = again.stdout + again.stderr
    assert f"reusing FINISHED child run {first.info.run_id}" in output
    assert f"resuming child run {second.info.run_id}" in output
    check_continued(store, first.info.run_id, second.info.run_id)
    killed = [r for r in store.top_level("tune_lr") if r.info.status != "FINISHED"]
    assert len(killed) == 1 and killed[0].data.tags["continued_in"] != killed[0].info.run_id


def test_a_live_run_is_not_taken_over(store):
    proc = start(store, "train", store.params({"epochs": "30"}))
    try:
        run_id = wait_until(lambda: next((r.info.run_id for r in store.top_level("train")
                                          if 1 in store.steps(r.info.run_id, "test_acc")), None), proc)
        other = store.cli("train", "--resume_run_id", run_id)
        lines = other.stderr.strip().splitlines()
        assert other.returncode == 2 and len(lines) == 1, other.stderr[-2000:]
        assert f"run {run_id} is live" in lines[0] and "force=true" in lines[0]
        assert store.client.get_run(run_id).info.status == "RUNNING"
        assert proc.poll() is None  # the writer goes on, untouched
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
