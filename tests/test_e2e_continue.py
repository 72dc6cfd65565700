"""Stop anywhere, continue with one command: a stage killed mid-child, run again, reuses its
finished children, resumes the interrupted one from last.pt, trains the rest; a live run is
never taken over; a resume continues the same run or refuses; one writer per run; a second signal
never cuts the cleanup short. Processes are held at pause points (pipeline/pause.py), never raced."""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from support.digits import colour_params
from support.processes import Pause
from support.store import PROJECT, VENV_BIN

pytestmark = pytest.mark.e2e

LRS = ["0.002", "0.001", "0.0005"]


def start(store, entry, params, cli=False, pause=None):
    if cli:
        cmd = [str(VENV_BIN / "python"), "-m", "pipeline", entry]
        for key, value in params.items():
            cmd += [f"--{key}", value]
    else:
        cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", entry, "--env-manager", "local"]
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]
    return subprocess.Popen(cmd, cwd=PROJECT if cli else store.root, env=pause.env(store.env) if pause else store.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def child_named(store, name):
    runs = [r for r in store.runs() if r.info.run_name == name]
    return runs[0] if runs else None


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
def test_sigkill_mid_child_then_the_same_command_continues_the_stage(store, tmp_path):
    pause = Pause(tmp_path / "pause", "epoch:5@tune_lr")  # 3 epochs a child: the second child's epoch 2
    proc = start(store, "tune_lr", params(store), pause=pause)
    _, second_id = pause.wait("epoch-5", proc)
    second = store.client.get_run(second_id)
    assert second.info.run_name == f"tune_lr lr={LRS[1]}" and store.steps(second_id, "test_acc") == [1, 2]
    first = child_named(store, f"tune_lr lr={LRS[0]}")
    assert first.info.status == "FINISHED"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert store.client.get_run(second_id).info.status == "RUNNING"  # nobody could mark it
    again = store.mlflow_run("tune_lr", params(store))
    output = again.stdout + again.stderr
    assert f"reusing FINISHED child run {first.info.run_id}" in output
    assert f"resuming child run {second_id} after epoch 2" in output
    check_continued(store, first.info.run_id, second_id)
    taken_over = store.client.get_run(second_id).data.params
    assert [k for k in taken_over if k.startswith("writer.")] == ["writer.1"]  # adopted by one claim
    killed = [r for r in store.top_level("tune_lr") if r.info.status != "FINISHED"]
    assert len(killed) == 1 and killed[0].data.tags["continued_in"] != killed[0].info.run_id


def test_a_live_run_is_not_taken_over(store, tmp_path):
    pause = Pause(tmp_path / "pause", "epoch:1")  # held after its first epoch, alive and RUNNING
    proc = start(store, "train", store.params({"epochs": "2"}), pause=pause)
    try:
        _, run_id = pause.wait("epoch-1", proc)
        other = store.cli("train", "--resume_run_id", run_id)
        lines = other.stderr.strip().splitlines()
        assert other.returncode == 2 and len(lines) == 1, other.stderr[-2000:]
        assert f"run {run_id} is live" in lines[0] and "force=true" in lines[0]
        run = store.client.get_run(run_id)
        assert run.info.status == "RUNNING" and not [k for k in run.data.params if k.startswith("writer.")]
        assert proc.poll() is None  # the writer goes on, untouched
        pause.release("epoch-1")
        assert proc.wait(timeout=300) == 0
        assert store.client.get_run(run_id).info.status == "FINISHED"
        assert store.steps(run_id, "test_acc") == [1, 2]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def killed_train_run(store, pause_dir, params, epoch: int) -> str:
    """A `train` run SIGKILLed while held after `epoch` (its record written): RUNNING, with last.pt."""
    pause = Pause(pause_dir, f"epoch:{epoch}")
    proc = start(store, "train", params, cli=True, pause=pause)
    try:
        _, run_id = pause.wait(f"epoch-{epoch}", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert store.client.get_run(run_id).info.status == "RUNNING"
    return run_id


def last_pt_epoch(store, run_id, tmp_path) -> int:
    path = store.client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path))
    return torch.load(path, weights_only=True)["epoch"]


def test_checkpoint_every_3_logs_each_epoch_once_from_the_weights_that_continued(store, colour_data, tmp_path):
    # shifted labels: the test accuracy falls after epoch 1, so no later epoch is a best (whose
    # best.pt brings a last.pt with it) and epochs 4-5 are trained after the last last.pt (epoch 3)
    run_params = colour_params(store, colour_data, "shifted", {"epochs": "6", "checkpoint_every": "3"})
    run_id = killed_train_run(store, tmp_path / "pause", run_params, 5)
    covered = last_pt_epoch(store, run_id, tmp_path)
    assert covered == 3  # the precondition: two epochs trained past the last checkpoint
    for key in ("test_acc", "train_loss", "epoch_time_s"):
        assert store.steps(run_id, key) == [1, 2, 3], key  # epochs 4-5 died unlogged with their weights
    more = store.cli("train", "--resume_run_id", run_id, "--epochs", "9")  # what a resume would drop: refused
    assert more.returncode == 2 and (
        f"error: run {run_id} resumes with the parameters it started with, not -P epochs=9 (the run's: 6): drop it, "
        f"or start a new run to train with it") in more.stderr.splitlines()
    resumed_at = time.time() * 1000
    resumed = store.cli("train", "--resume_run_id", run_id, check=True)
    assert "resuming after epoch 3" in resumed.stdout
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = {key: sorted(store.client.get_metric_history(run_id, key), key=lambda m: m.step)
               for key in ("test_acc", "train_loss", "epoch_time_s")}
    for key, metrics in history.items():
        assert [m.step for m in metrics] == [1, 2, 3, 4, 5, 6], key  # each epoch exactly once
        assert all(m.timestamp >= resumed_at for m in metrics if m.step > 3), key  # from the resume
        assert all(m.timestamp < resumed_at for m in metrics if m.step <= 3), key
    accs = [m.value for m in history["test_acc"]]
    assert (run.data.metrics["best_test_acc"], run.data.metrics["best_epoch"]) == (max(accs), accs.index(max(accs)) + 1)


def test_a_resume_after_the_training_data_changed_is_refused_in_one_line(store, tmp_path):
    data_copy = tmp_path / "data"
    shutil.copytree(store.data_dir, data_copy)
    run_id = killed_train_run(store, tmp_path / "pause", store.params({"epochs": "3", "data_dir": str(data_copy)}), 1)
    before = store.client.get_run(run_id)
    train_mat = next(data_copy.glob("*/train_32x32.mat"))
    raw = bytearray(train_mat.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one pixel of one image
    train_mat.write_bytes(bytes(raw))
    proc = store.cli("train", "--resume_run_id", run_id, "--force", "true")  # force does not override it
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    recorded = before.data.tags["data_digest"]
    assert f"run {run_id} cannot be continued here: data digest {recorded[:16]} then" in lines[0]
    assert "code_version" not in lines[0]  # only what differs
    after = store.client.get_run(run_id)
    assert (after.info.status, after.data.tags, after.data.params) == \
        (before.info.status, before.data.tags, before.data.params)  # nothing written
    assert store.steps(run_id, "test_acc") == [1]


def test_two_resumers_released_together_give_one_writer(store, tmp_path):
    run_id = killed_train_run(store, tmp_path / "pause", store.params({"epochs": "2"}), 1)
    pauses = [Pause(tmp_path / f"resumer{i}", "takeover") for i in range(2)]
    procs = [start(store, "train", {"resume_run_id": run_id}, cli=True, pause=p) for p in pauses]
    try:
        for pause, proc in zip(pauses, procs):
            pause.wait("takeover-1", proc)  # both checked the run: dead, nobody writes it
        for pause in pauses:  # released together
            pause.release("takeover-1")
        outcomes = [(proc.wait(timeout=300), proc.stdout.read(), proc.stderr.read()) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], outcomes
    (_, _, refused), = [o for o in outcomes if o[0] == 2]
    lines = refused.strip().splitlines()
    assert len(lines) == 1 and f"run {run_id} was taken over by another process" in lines[0], refused
    (_, trained, _), = [o for o in outcomes if o[0] == 0]
    assert "resuming after epoch 1" in trained
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and store.steps(run_id, "test_acc") == [1, 2]
    assert [k for k in run.data.params if k.startswith("writer.")] == ["writer.1"]


def pending_signals(pid: int) -> set:
    """Signals sent to `pid` that its handlers have not received yet (from /proc)."""
    pending = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return {n for n in range(1, 65) if pending >> (n - 1) & 1}


def test_a_stage_killed_outright_after_it_registered_leaves_no_version_once_continued(store, tmp_path):
    name = "svhn-classifier-synthetic"
    pause = Pause(tmp_path / "pause", "registered@retrain")  # its model registered, the alias moved
    proc = start(store, "retrain", store.params({"max_epochs": "1"}), pause=pause)
    _, killed_id = pause.wait("registered-1", proc)
    left = store.client.get_model_version_by_alias(name, "champion")
    assert left.run_id == killed_id
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: nothing withdraws the version
    proc.wait(timeout=60)
    assert store.client.get_run(killed_id).info.status == "RUNNING"
    again = store.mlflow_run("retrain", store.params({"max_epochs": "1"}))
    assert f"withdrew {name} version {left.version}: its run did not finish" in again.stdout
    (version,) = store.client.search_model_versions(f"name = '{name}'")  # the killed run's is gone
    (finished,) = [r for r in store.top_level("retrain") if r.info.status == "FINISHED"]
    assert version.run_id == finished.info.run_id != killed_id
    assert store.client.get_model_version_by_alias(name, "champion").version == version.version


def test_sigint_then_sigterm_mid_epoch_ends_the_run_killed_and_the_printed_command_continues_it(store, tmp_path):
    # 2 batches an epoch: batch 4 is epoch 2's second; held again in the cleanup, where the SIGTERM lands
    pause = Pause(tmp_path / "pause", "batch:4,cleanup")
    proc = start(store, "train", store.params({"epochs": "3"}), cli=True, pause=pause)
    try:
        _, run_id = pause.wait("batch-4", proc)
        assert store.steps(run_id, "test_acc") == [1]
        os.kill(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        pause.wait("cleanup-1", proc)
        assert store.client.get_run(run_id).info.status == "RUNNING"  # not yet marked
        time.sleep(max(0.0, 0.2 - (time.monotonic() - sent)))
        os.kill(proc.pid, signal.SIGTERM)  # as `mlflow run` follows a Ctrl-C, mid-cleanup
        while int(signal.SIGTERM) in pending_signals(proc.pid):  # delivered while held, not after
            time.sleep(0.01)
        time.sleep(0.2)  # its Python handler runs at once: the held process only sleeps
        pause.release("cleanup-1")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert store.client.get_run(run_id).info.status == "KILLED"
    command = re.search(r"Continue with the same command: (mlflow run .*)", err).group(1)
    assert f"-P resume_run_id={run_id}" in command
    pairs = dict(p.split("=", 1) for p in re.findall(r"-P '?([^ ']+)'?", command))
    store.mlflow_run("train", pairs)
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and store.steps(run_id, "test_acc") == [1, 2, 3]
