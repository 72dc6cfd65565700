"""The run lifecycle's rules as plain functions: who is a live writer, one claim per takeover,
and a resume that continues the same run or refuses."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from pipeline import config, lifecycle, tracking
from pipeline.errors import LineageError
from pipeline.runtime import Runtime


def fake_run(status="RUNNING", tags=None, params=None, run_id="r1", end_time=None):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status, end_time=end_time),
                           data=SimpleNamespace(tags=tags or {}, params=params or {}))


def stamp_of(pid: int, **changes) -> str:
    return lifecycle.stamp(**{"pid": str(pid), "start": lifecycle.process_start(pid), **changes})


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_process_on_this_machine_is_the_writer_and_a_dead_or_recycled_pid_is_not(sleeper):
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": stamp_of(sleeper.pid)}))
    # the same pid number, but another process's start time: a recycled pid, not our writer
    recycled = stamp_of(sleeper.pid, start=str(int(lifecycle.process_start(sleeper.pid)) + 1))
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": recycled})) is None
    recorded = stamp_of(sleeper.pid)  # its identity while it ran
    sleeper.kill()
    sleeper.wait()
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": recorded})) is None
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": stamp_of(os.getpid())})) is None  # this process


def test_a_writer_in_another_container_with_this_hostname_is_judged_by_its_heartbeat(sleeper):
    # a pid of another pid namespace means nothing here, alive or not: only the heartbeat's age counts
    elsewhere = stamp_of(sleeper.pid, pidns="4026531999")
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": elsewhere}))
    dead_elsewhere = stamp_of(2 ** 22 + 1, pidns="4026531999", start="1")
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": dead_elsewhere}))  # fresh: protected
    stale = stamp_of(2 ** 22 + 1, boot="another-boot", time=f"{time.time() - lifecycle.STALE_AFTER_S - 5:.0f}")
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": stale})) is None


def test_the_newest_of_heartbeat_and_claim_decides(sleeper):
    old_dead = stamp_of(2 ** 22 + 1, start="1", time=f"{time.time() - 100:.0f}")
    claim = stamp_of(sleeper.pid)
    run = fake_run(tags={"heartbeat": old_dead}, params={"writer.1": claim})
    assert lifecycle.live_writer(run)  # claimed just now by a live process
    # a run that is not RUNNING: its claim counts only if made after the run last ended
    claimed_at_ms = float(lifecycle.parse_stamp(claim)["time"]) * 1000
    ended_after = fake_run(status="KILLED", params={"writer.1": claim}, end_time=int(claimed_at_ms) + 1)
    assert lifecycle.live_writer(ended_after) is None
    ended_before = fake_run(status="KILLED", params={"writer.1": claim}, end_time=int(claimed_at_ms) - 1)
    assert lifecycle.live_writer(ended_before)  # claimed, not yet marked RUNNING by its claimant


def test_a_continued_runs_claimant_stays_live_while_it_beats_the_run_and_no_other_beat_counts():
    """A command on another machine continues an earlier KILLED run (claim 20 minutes old, so stale
    alone); its heartbeats on that run keep it live, a heartbeat of another writer does not."""
    long_ago = time.time() - lifecycle.STALE_AFTER_S - 300
    elsewhere = dict(boot="another-boot", start="1")
    claim = stamp_of(2 ** 22 + 1, time=f"{long_ago:.3f}", **elsewhere)
    ended = int(long_ago * 1000) - 1000  # the claim came after the run's end

    def continued(heartbeat: str | None):
        return fake_run(status="KILLED", params={"writer.1": claim}, end_time=ended,
                        tags={"heartbeat": heartbeat} if heartbeat else {})

    assert lifecycle.live_writer(continued(stamp_of(2 ** 22 + 1, **elsewhere)))  # its beat just now
    assert lifecycle.live_writer(continued(None)) is None  # never beaten: its claim alone is stale
    assert lifecycle.live_writer(continued(stamp_of(2 ** 22 + 2, **elsewhere))) is None  # another writer's beat


def test_the_older_stamp_is_still_read(sleeper):
    import socket

    older = f"{socket.gethostname()} {2 ** 22 + 1} {time.time():.0f}"
    assert lifecycle.parse_stamp(older)["pid"] == str(2 ** 22 + 1)
    assert lifecycle.live_writer(fake_run(tags={"heartbeat": older})) is None


RECORD = {"tags": {"data_digest": "d" * 64, "code_version": "c" * 12},
          "params": {"device_resolved": "cuda:0", "precision_resolved": "bf16"}}


@pytest.mark.parametrize("what,now,line", [
    ("data", ("e" * 64, "cuda", "bf16"), f"data digest {'d' * 16} then, {'e' * 16} now"),
    ("device", ("d" * 64, "cpu", "bf16"), "device type cuda then, cpu now"),
    ("precision", ("d" * 64, "cuda", "fp32"), "precision bf16 then, fp32 now")])
def test_a_resume_names_what_differs_from_the_runs_record(monkeypatch, what, now, line):
    monkeypatch.setattr(lifecycle, "code_version", lambda: "c" * 12)
    run = fake_run(**RECORD)
    lifecycle.check_same_record(run, "d" * 64, Runtime(torch.device("cuda"), "bf16"))  # the same: no refusal
    with pytest.raises(LineageError) as err:
        digest, device_type, precision = now
        lifecycle.check_same_record(run, digest, Runtime(torch.device(device_type), precision))
    message = str(err.value)
    assert line in message and "\n" not in message and message.count(" then, ") == 1


def test_a_resume_with_other_code_or_no_record_is_refused(monkeypatch):
    monkeypatch.setattr(lifecycle, "code_version", lambda: "f" * 12)
    with pytest.raises(LineageError, match=f"code_version {'c' * 12} then, {'f' * 12} now"):
        lifecycle.check_same_record(fake_run(**RECORD), "d" * 64, Runtime(torch.device("cuda"), "bf16"))
    with pytest.raises(LineageError, match="data digest unrecorded then"):
        lifecycle.check_same_record(fake_run(), "d" * 64, Runtime(torch.device("cuda"), "bf16"))


def test_of_two_claims_on_one_reading_of_a_run_only_the_first_is_accepted(tmp_path, monkeypatch):
    uri = tracking.new_local_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = tracking.client()
    run_id = client.create_run("0").info.run_id
    client.set_terminated(run_id, "KILLED")
    seen = client.get_run(run_id)  # both processes read the run before either claims it
    cfg = config.load("train")
    monkeypatch.setattr(lifecycle, "stamp", lambda task="": "host=a pid=1 time=1")
    lifecycle.claim(seen, cfg, "resumed")
    monkeypatch.setattr(lifecycle, "stamp", lambda task="": "host=b pid=2 time=1")
    with pytest.raises(LineageError, match=f"run {run_id} was taken over by another process \\(a pid 1\\)"):
        lifecycle.claim(seen, cfg, "resumed")
    assert client.get_run(run_id).data.params == {"writer.1": "host=a pid=1 time=1"}
    lifecycle.claim(client.get_run(run_id), cfg, "resumed")  # a later reading claims the next
    assert client.get_run(run_id).data.params["writer.2"] == "host=b pid=2 time=1"


def test_a_killed_run_claimed_by_a_live_process_not_yet_running_is_not_claimed_again(tmp_path, monkeypatch,
                                                                                     sleeper):
    """The window between a claim and its claimant marking the run RUNNING: the run still reads
    KILLED, and a second process that reads it then must not become a second writer."""
    uri = tracking.new_local_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = tracking.client()
    run_id = client.create_run("0").info.run_id
    client.set_terminated(run_id, "KILLED")
    time.sleep(0.01)  # the claim is stamped after the end, to the millisecond
    client.log_param(run_id, "writer.1", stamp_of(sleeper.pid))  # a live process claimed it just now
    seen = client.get_run(run_id)
    assert seen.info.status == "KILLED"
    cfg = config.load("train")
    with pytest.raises(LineageError, match=f"run {run_id} is live .*pid {sleeper.pid}, heartbeat"):
        lifecycle.claim(seen, cfg, "resumed")
    assert set(client.get_run(run_id).data.params) == {"writer.1"}
    lifecycle.claim(seen, cfg.replace(force=True), "resumed")  # force=true: that process is gone, says the user
    assert set(client.get_run(run_id).data.params) == {"writer.1", "writer.2"}


def test_the_heartbeat_thread_never_beats_over_a_process_that_took_a_run_over(tmp_path, monkeypatch):
    uri = tracking.new_local_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = tracking.client()
    mine, taken = (client.create_run("0").info.run_id for _ in range(2))
    theirs = lifecycle.stamp(pid="999999", time="1")
    client.log_param(taken, f"{lifecycle.CLAIM}1", theirs)
    client.set_tag(taken, lifecycle.HEARTBEAT, theirs)  # the new writer's beat
    monkeypatch.setattr(lifecycle, "BEAT_EVERY_S", 0.05)
    with lifecycle.heartbeat("0" * 32, mine, taken):  # the first: a run the store no longer has
        deadline = time.monotonic() + 30
        while lifecycle.HEARTBEAT not in client.get_run(mine).data.tags:
            assert time.monotonic() < deadline, "the heartbeat thread never beat"
            time.sleep(0.05)
        time.sleep(0.3)  # several more beats
    assert lifecycle.is_mine(lifecycle.parse_stamp(client.get_run(mine).data.tags[lifecycle.HEARTBEAT]))
    assert client.get_run(taken).data.tags[lifecycle.HEARTBEAT] == theirs
