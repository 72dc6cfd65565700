"""executor=ray: the same MLflow record as executor=local, on a local Ray and on a simulated
two-node cluster with a real `mlflow server`; a killed worker's child resumes; refusals.

Ray stays on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, no dashboard); every test stops
exactly the Ray it started: `mlflow run` stops its local Ray on exit, the cluster fixture its
two nodes.
"""
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from support.processes import Pause, free_port, mlflow_server
from support.store import PROJECT, Store, VENV_BIN, kept_if_failed
from pipeline import cluster, config
from pipeline.errors import ConfigError
from pipeline.lifecycle import parse_stamp
from pipeline.workflow import CHAINS

pytestmark = pytest.mark.e2e

LRS = "0.001,0.0005,0.0002,0.0001"
# varies by executor and by nothing the child computes
EXECUTION_PARAMS = {"executor", "cpus_per_trial", "ray_address", "torch_threads"}
EXECUTION_TAGS = {"mlflow.parentRunId", "heartbeat", "ray_node_id", "best_child_run_id"}
TIMINGS = {"epoch_time_s", "total_time_s", "train_images_per_s"}


@pytest.fixture(autouse=True)
def loopback_ray(monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU-only Rays: the same on a GPU machine


def ray_env(store: Store) -> dict[str, str]:
    store.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    store.env["CUDA_VISIBLE_DEVICES"] = ""  # every Ray these tests start sees no GPU, whatever the machine
    return store.env


def by_name(store: Store, run_id: str) -> dict:
    return {r.info.run_name: r for r in store.children(run_id)}


def record(store: Store, run) -> dict:
    """What a run's record holds, less what says where or how fast it ran."""
    return {"params": {k: v for k, v in run.data.params.items() if k not in EXECUTION_PARAMS},
            "tags": {k: v for k, v in run.data.tags.items() if k not in EXECUTION_TAGS},
            "metrics": {k: [(m.step, m.value) for m in sorted(store.client.get_metric_history(run.info.run_id, k),
                                                              key=lambda m: m.step)]
                        for k in run.data.metrics if k not in TIMINGS and not k.startswith("system/")},
            "steps": {k: store.steps(run.info.run_id, k) for k in run.data.metrics if not k.startswith("system/")},
            "artifacts": store.artifacts(run.info.run_id), "status": run.info.status}


def test_tune_lr_on_ray_records_what_local_records(store):
    params = store.params({"init": "scratch", "lrs": LRS, "epochs": "1"})
    # one torch thread, as each Ray task with cpus_per_trial=1 has: then the numbers agree bit for bit
    store.env["OMP_NUM_THREADS"] = "1"
    store.mlflow_run("tune_lr", dict(params, executor="local"))
    del store.env["OMP_NUM_THREADS"]
    ray_env(store)
    proc = store.mlflow_run("tune_lr", dict(params, executor="ray", cpus_per_trial="1"))
    ray_run = next(r for r in store.top_level("tune_lr") if r.data.params["executor"] == "ray")
    local_run = next(r for r in store.top_level("tune_lr") if r.data.params["executor"] == "local")
    local_children, ray_children = by_name(store, local_run.info.run_id), by_name(store, ray_run.info.run_id)
    assert sorted(ray_children) == sorted(local_children) == sorted(f"tune_lr lr={lr}" for lr in LRS.split(","))
    for name, child in ray_children.items():
        assert child.data.tags["ray_node_id"]  # placed by Ray, not trained in the driver
        assert "ray_node_id" not in local_children[name].data.tags
        assert record(store, child) == record(store, local_children[name]), name
    assert record(store, ray_run) == record(store, local_run)
    winner = store.client.get_run(ray_run.data.tags["best_child_run_id"]).info.run_name
    assert winner == store.client.get_run(local_run.data.tags["best_child_run_id"]).info.run_name
    # one progress line per child as it moves: epoch, accuracy, img/s
    for lr in LRS.split(","):
        assert f"tune_lr lr={lr:<{len('0.0005')}}  epoch 1/1  test_acc" in proc.stdout
    assert proc.stdout.count(" img/s  node ") == 4


def test_sqlite_store_with_a_ray_cluster_elsewhere_is_refused_in_one_line(store):
    proc = store.cli("tune_lr", *sum((["--" + k, v] for k, v in store.params(
        {"init": "scratch", "executor": "ray", "ray_address": "ray://192.0.2.10:10001"}).items()), []))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a tracking server" in lines[0] and "sqlite" in lines[0]
    assert store.runs() == []


def test_a_child_that_fits_no_node_of_the_local_ray_is_refused_before_any_run(store):
    ray_env(store)
    proc = store.cli("tune_lr", *sum((["--" + k, v] for k, v in store.params(
        {"init": "scratch", "executor": "ray", "cpus_per_trial": "999"}).items()), []))
    assert proc.returncode == 2, proc.stderr[-3000:]
    cpus = f"{os.cpu_count():g}"  # the local Ray started for the check: this machine's CPUs
    # (Ray's own start-up notice may come before it on stderr)
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cpus_per_trial=999 gpus_per_trial=0 fits no Ray node (its nodes: {cpus} CPUs 0 GPUs): lower them"]
    assert store.runs() == []


def test_a_child_must_fit_one_node_not_the_largest_figures_of_two():
    def node(cpus, gpus=0):
        return {"Alive": True, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    nodes = [node(16), node(4, 1)]  # 8 CPUs on the first, the GPU on the second: nowhere both
    assert cluster.placement_problem(nodes, 8, 1) == \
        "cpus_per_trial=8 gpus_per_trial=1 fits no Ray node (its nodes: 16 CPUs 0 GPUs; 4 CPUs 1 GPUs): lower them"
    assert cluster.placement_problem(nodes, 4, 1) == cluster.placement_problem(nodes, 16, 0) == ""


def test_a_ray_address_where_nothing_listens_is_refused_at_once():
    import ray

    address = f"127.0.0.1:{free_port()}"  # ray.init would retry it for about 15 minutes
    with pytest.raises(ConfigError) as err:
        cluster.connect(config.load("tune_lr", {"executor": "ray", "ray_address": address}))
    assert str(err.value) == (f"could not reach Ray at ray_address={address}: nothing answers there "
                              f"(ConnectionRefusedError); start it with `ray start --head` or leave ray_address "
                              f"empty for a local Ray")
    assert not ray.is_initialized()


# -- a worker that dies ------------------------------------------------------------------------------

def start(store: Store, entry: str, params: dict, pause: Pause | None = None) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = pause.env(ray_env(store)) if pause else ray_env(store)  # Ray's workers inherit it
    return subprocess.Popen(cmd, cwd=store.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def child_held_after_epoch_1(store: Store, params: dict):
    """(process, the child run) with the child's worker held once epoch 1's record is written: a
    Ray retry of it passes the point (each marker holds once)."""
    pause = Pause(store.root / "pause", "epoch:1")
    proc = start(store, "tune_lr", params, pause)
    worker_pid, child_id = pause.wait("epoch-1", proc)
    assert store.steps(child_id, "test_acc") == [1]
    return proc, worker_pid, store.client.get_run(child_id)


def kill_worker_mid_child(store: Store, max_retries: str):
    proc, worker_pid, child = child_held_after_epoch_1(store, store.params({
        "init": "scratch", "lrs": "0.001", "epochs": "3", "executor": "ray", "max_retries": max_retries}))
    assert worker_pid != proc.pid and int(parse_stamp(child.data.tags["heartbeat"])["pid"]) == worker_pid
    os.kill(worker_pid, signal.SIGKILL)  # the Ray worker training the child, after its epoch 1
    out, err = proc.communicate(timeout=300)
    return proc, child.info.run_id, worker_pid, out, err


def test_a_killed_worker_is_retried_and_its_child_resumes_from_last_pt(store):
    proc, child_id, dead_pid, out, err = kill_worker_mid_child(store, "3")
    assert proc.returncode == 0, err[-3000:]
    (stage,) = store.top_level("tune_lr")
    assert stage.info.status == "FINISHED"
    (child,) = store.children(stage.info.run_id)  # the same run, resumed: no second one
    assert child.info.run_id == child_id and child.info.status == "FINISHED"
    assert int(parse_stamp(child.data.tags["heartbeat"])["pid"]) != dead_pid  # another worker finished it
    for key in ("test_acc", "train_loss", "epoch_time_s"):
        assert store.steps(child_id, key) == [1, 2, 3], key  # every epoch logged once
    assert "checkpoints/last.pt" not in store.artifacts(child_id)


def test_a_child_whose_worker_dies_for_good_fails_the_stage_in_one_line(store):
    proc, child_id, _, out, err = kill_worker_mid_child(store, "0")
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: child 'tune_lr lr=0.001' failed: its worker died 1 times "
                      "(WorkerCrashedError); run the same command again to resume it, or raise -P max_retries"]
    assert store.client.get_run(child_id).info.status == "FAILED"
    (stage,) = store.top_level("tune_lr")
    assert stage.info.status == "FAILED"


def test_ctrl_c_cancels_the_tasks_marks_runs_killed_and_the_command_continues(store):
    params = store.params({"init": "scratch", "lrs": "0.001", "epochs": "3", "executor": "ray"})
    proc, _, child = child_held_after_epoch_1(store, params)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (stage,) = store.top_level("tune_lr")
    children = store.children(stage.info.run_id)
    assert {c.info.status for c in children} == {"KILLED"}, err[-3000:]
    # ours is KILLED; `mlflow run` then marks its run FAILED on Ctrl-C (it compares a status string
    # with RunStatus integers, so it overwrites KILLED): either way, not left RUNNING
    assert stage.info.status in ("KILLED", "FAILED")
    command = err.split("Continue with the same command: ")[1].splitlines()[0]
    assert "-P executor=ray" in command
    store.mlflow_run("tune_lr", params)
    done = [r for r in store.top_level("tune_lr") if r.info.status == "FINISHED"]
    (finished,) = done
    (resumed,) = store.children(finished.info.run_id)
    assert resumed.info.run_id == child.info.run_id  # taken over and resumed, not trained again
    assert resumed.info.status == "FINISHED" and store.steps(resumed.info.run_id, "test_acc") == [1, 2, 3]


# -- a two-node cluster and a tracking server ------------------------------------------------------

def test_sqlite_study_storage_follows_the_tracking_stores_rule_on_a_one_machine_cluster(tmp_path, monkeypatch):
    """SQLite is refused where the MLflow store would be (trials on other machines), and only
    there: `auto` joining a cluster whose nodes are all this machine keeps it.
    (Here, not in test_autotune: under pytest-xdist every test that starts Ray is in this file,
    so one worker runs them in turn; address="local" starts a Ray of its own even while a
    cluster fixture is up, since a bare ray.init() joins the newest Cluster.)"""
    import ray

    from pipeline import tuning

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        joined = config.load("autotune", {"executor": "ray", "ray_address": "auto"})
        cluster.check_tracking(joined)  # the MLflow store: SQLite is fine here
        assert tuning.storage_url(joined, f"sqlite:///{tmp_path}/mlflow.db") == \
            f"sqlite:///{tmp_path}/mlflow.optuna.db"
    finally:
        ray.shutdown()
        cluster.RAY.clear()


@pytest.fixture(scope="module")
def two_nodes():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=0)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, data_dir):
    with kept_if_failed(request, tmp_path_factory.mktemp("ray-server")) as root, \
            mlflow_server(root, data_dir) as store:
        yield store


def test_tasks_read_the_data_from_the_object_store_not_from_disk(two_nodes, server, colour_data, tmp_path,
                                                                 monkeypatch):
    """The driver decodes the .mat files once; with them deleted, the children still train, on
    either data pipeline (the seed's torchvision one serves the same decoded tensors)."""
    import mlflow
    import ray

    from pipeline import config, data, executor, runner, runtime
    from pipeline.cluster import RAY

    folder = tmp_path / "copy"
    shutil.copytree(colour_data / "right", folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = config.load("tune_lr", {"dataset": "svhn", "verify": "false", "data_dir": str(folder), "bs": "32",
                                  "epochs": "1", "init": "scratch", "lrs": "0.001,0.0005", "log_every": "1000",
                                  "executor": "ray", "ray_address": two_nodes.address,
                                  "device": "cpu", "precision": "fp32", "data_pipeline": "tensor"})
    dataset = data.load(cfg)
    shutil.rmtree(folder)  # and the decode cache's source is gone with it
    parent = mlflow.MlflowClient().create_run("0", run_name="object store check").info.run_id
    specs = [executor.ChildSpec(f"point {lr}", cfg.replace(lr=lr, data_pipeline=pipeline), "resnet")
             for lr, pipeline in zip(cfg.lrs, ("tensor", "torchvision"))]
    stage = runner.Stage(parent, runtime.of(cfg))
    try:
        results = executor.run_children(cfg, stage, specs, dataset)
        # the same children again are reused where they are: their record still names the node that
        # trained them, not the one whose task found them finished
        server.client.set_tag(results[0].run_id, "ray_node_id", "the node that trained it")
        again = executor.run_children(cfg, stage, specs, dataset)
    finally:
        ray.shutdown()  # only disconnects: the cluster is the fixture's
        RAY.clear()
    assert [r.run_id for r in again] == [r.run_id for r in results]
    assert server.client.get_run(results[0].run_id).data.tags["ray_node_id"] == "the node that trained it"
    assert [r.name for r in results] == ["point 0.001", "point 0.0005"]
    for result in results:
        run = server.client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert server.steps(result.run_id, "test_acc") == [1]
        assert run.data.tags["data_digest"] == dataset.digest
    assert [server.client.get_run(r.run_id).data.params["data_pipeline"] for r in results] == ["tensor", "torchvision"]
    assert isinstance(results[0], runner.RunResult)


# -- the driver: what it hands its tasks, and what it leaves when it breaks -------------------------

def in_process_stage(server, two_nodes, monkeypatch, **extra):
    """(cfg, dataset, parent run id) for a tune_lr driven from this process, children on the nodes."""
    import mlflow

    from pipeline import config, data

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = config.load("tune_lr", server.params({"init": "scratch", "lrs": "0.001", "epochs": "1",
                                                "executor": "ray", "ray_address": two_nodes.address,
                                                "device": "cpu", **extra}))
    parent = mlflow.MlflowClient().create_run("0", run_name="driver check").info.run_id
    return cfg, data.load(cfg), parent


def disconnect():
    import ray

    from pipeline.cluster import RAY

    ray.shutdown()  # only disconnects: the cluster is the fixture's
    RAY.clear()


def test_a_worker_that_differs_from_the_driver_refuses_in_one_line_before_any_run(two_nodes, server, monkeypatch):
    from pipeline import executor, keys, runner, runtime
    from pipeline.errors import ChildFailed

    cfg, dataset, parent = in_process_stage(server, two_nodes, monkeypatch)
    mine = runtime.of(cfg)
    other_precision = runtime.Runtime(mine.device, "fp32" if mine.precision == "bf16" else "bf16")
    cases = [(runner.Stage(parent, mine, code_version="0" * 12),
              f"code version {keys.code_version()} here, {'0' * 12} on the driver"),
             (runner.Stage(parent, other_precision, code_version=keys.code_version()),
              f"device/precision cpu/{mine.precision} here, cpu/{other_precision.precision} on the driver")]
    try:
        for stage, differs in cases:
            with pytest.raises(ChildFailed) as err:
                executor.run_children(cfg, stage, [executor.ChildSpec("point", cfg, "resnet")], dataset)
            line = str(err.value)
            assert "\n" not in line and differs in line, line
            assert line.startswith("child 'point' failed: NotLikeTheDriver: node ")
            node = line.split("node ")[1][:8]
            assert node in {n.node_id[:8] for n in two_nodes.list_all_nodes()}  # names the node
    finally:
        disconnect()
    assert server.children(parent) == []  # refused before any run was made


def test_any_driver_error_cancels_the_tasks_and_marks_their_runs_killed(two_nodes, server, monkeypatch, tmp_path):
    """An error in the driver itself (here its progress loop breaks while the child's worker is
    held after epoch 1), not only Ctrl-C or a Ray error: the task is cancelled (its worker gone)
    and its run KILLED, named on the error for the command's hint. Then the same child again, the
    driver breaking once the task has claimed it and before it marks it RUNNING: the run, still
    KILLED, is ended again, so the claim of a worker now gone never reads as a live writer. Last, a
    later command's task claims it, left RUNNING, from this (earlier, unfinished) stage run, and the
    driver breaks before the task adopts it: ended KILLED there too, under the run it was taken from."""
    from pipeline import executor, interrupts, keys, lifecycle, runner, runtime

    cfg, dataset, parent = in_process_stage(server, two_nodes, monkeypatch, epochs="3")
    pause = Pause(tmp_path / "pause", "epoch:1,claimed")
    for key, value in pause.env({}).items():
        monkeypatch.setenv(key, value)  # the driver hands them to its workers
    real_refresh = executor.Display.refresh
    held_at = {"marker": pause.folder / "epoch-1.paused"}

    def breaks_while_the_worker_is_held(self, *args, **kwargs):
        real_refresh(self, *args, **kwargs)
        if held_at["marker"].exists():
            raise RuntimeError("the driver broke")

    monkeypatch.setattr(executor.Display, "refresh", breaks_while_the_worker_is_held)

    def the_driver_breaks(on_stage) -> RuntimeError:
        try:
            with pytest.raises(RuntimeError, match="the driver broke") as err:
                executor.run_children(cfg, on_stage, [executor.ChildSpec("point", cfg, "resnet")], dataset)
        finally:
            disconnect()
        return err.value

    stage = runner.Stage(parent, runtime.of(cfg), code_version=keys.code_version())
    broke = the_driver_breaks(stage)
    worker_pid = int((pause.folder / "epoch-1.paused").read_text().split()[0])
    (child,) = server.children(parent)
    assert child.info.status == "KILLED" and server.steps(child.info.run_id, "test_acc") == [1]
    assert interrupts.killed_runs(broke) == [child.info.run_id]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a force-cancelled task's worker is killed
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker {worker_pid} still runs after its task was cancelled")

    held_at["marker"] = pause.folder / "claimed-1.paused"
    the_driver_breaks(stage)
    again = server.client.get_run(child.info.run_id)
    claim = lifecycle.latest_claim(again)
    assert again.info.status == "KILLED" and claim["task"].startswith("ray-task:")  # claimed by the task
    assert float(claim["time"]) < again.info.end_time / 1000  # and ended after that
    assert lifecycle.claimed_since_it_ended(again) is None

    later_pause = Pause(tmp_path / "later", "claimed")  # a new worker counts its claims from 1 again
    for key, value in later_pause.env({}).items():
        monkeypatch.setenv(key, value)
    held_at["marker"] = later_pause.folder / "claimed-1.paused"
    server.client.update_run(child.info.run_id, "RUNNING")  # as a command killed outright leaves it
    later = server.client.create_run(again.info.experiment_id).info.run_id
    the_driver_breaks(runner.Stage(later, runtime.of(cfg), frozenset({parent}), code_version=keys.code_version()))
    taken = server.client.get_run(child.info.run_id)
    assert taken.data.tags["mlflow.parentRunId"] == parent  # claimed, not adopted yet
    assert lifecycle.latest_claim(taken)["task"] != claim["task"]  # the later command's task claimed it
    assert taken.info.status == "KILLED" and lifecycle.claimed_since_it_ended(taken) is None
    assert lifecycle.live_writer(taken) is None


def test_a_child_that_fails_stops_its_siblings_and_names_them_for_the_commands_hint(two_nodes, server, monkeypatch,
                                                                                      tmp_path):
    """One child raises in its worker while its sibling is held after epoch 1 (the driver reads the
    failure only once the sibling is held): the failure is one line, the failed child FAILED, the
    sibling cancelled and KILLED, and named on the error, so the CLI says how to continue it."""
    from pipeline import executor, interrupts, keys, runner, runtime
    from pipeline.errors import ChildFailed

    cfg, dataset, parent = in_process_stage(server, two_nodes, monkeypatch, epochs="3")
    pause = Pause(tmp_path / "pause", "epoch:1")
    for key, value in pause.env({}).items():
        monkeypatch.setenv(key, value)
    real_refresh = executor.Display.refresh

    def once_the_sibling_is_held(self, *args, **kwargs):
        deadline = time.monotonic() + 600
        while not (pause.folder / "epoch-1.paused").exists():
            assert time.monotonic() < deadline, "the sibling never reached its epoch 1"
            time.sleep(0.1)
        real_refresh(self, *args, **kwargs)

    monkeypatch.setattr(executor.Display, "refresh", once_the_sibling_is_held)
    stage = runner.Stage(parent, runtime.of(cfg), code_version=keys.code_version())
    specs = [executor.ChildSpec("held", cfg, "resnet"), executor.ChildSpec("broken", cfg, "no-such-net")]
    try:
        with pytest.raises(ChildFailed) as err:
            executor.run_children(cfg, stage, specs, dataset)
    finally:
        disconnect()
    assert str(err.value).startswith("child 'broken' failed: ") and "\n" not in str(err.value)
    statuses = {c.info.run_name: c.info.status for c in server.children(parent)}
    assert statuses.pop("held") == "KILLED" and set(statuses.values()) <= {"FAILED"}
    (held,) = [c for c in server.children(parent) if c.info.run_name == "held"]
    assert interrupts.killed_runs(err.value) == [held.info.run_id]
    assert server.steps(held.info.run_id, "test_acc") == [1]


def test_a_driver_stops_when_a_child_or_its_stage_run_is_taken_over_and_leaves_that_writers_runs(
        two_nodes, server, monkeypatch, tmp_path):
    """Another process (on another machine, beating just now) takes over, while this driver's child
    is held after epoch 1: first the child itself, then, in a second stage run, the stage run. Each
    time the driver stops with TakenOver naming that run, never as a failed child. The child taken
    over stays RUNNING with its one epoch (its new writer's now), as does a run that writer made
    under the stage run; the child whose stage run was taken over is cancelled and KILLED, with no
    "continue" hint, and a store that did not answer the driver's first check after the claim
    stopped nothing: the next turn's check found the claim."""
    from mlflow.exceptions import MlflowException

    from pipeline import executor, interrupts, keys, lifecycle, runner, runtime
    from pipeline.errors import TakenOver

    cfg, dataset, parent = in_process_stage(server, two_nodes, monkeypatch, epochs="3")
    elsewhere = dict(host="elsewhere", boot="another-machine", pid="4242", start="1")
    experiment_id = server.client.get_run(parent).info.experiment_id
    real_refresh = executor.Display.refresh
    phase = {}

    def takes_over_once_held(self, *args, **kwargs):
        real_refresh(self, *args, **kwargs)
        if "taken" in phase:  # the driver turns again after the claim (its check follows each refresh)
            phase["turns"] += 1
            assert phase["turns"] <= phase["turns_allowed"], "the driver never noticed the takeover"
        held = sorted(phase["pause"].folder.glob("epoch-*.paused"))  # -2 on a worker reused from phase 1
        if held and "taken" not in phase:
            phase["held"] = held[0].read_text().split()[1]
            phase["taken"] = phase["take"](phase["held"])
            server.client.log_param(phase["taken"], f"{lifecycle.CLAIM}1", lifecycle.stamp(**elsewhere))
            phase["turns"] = 0
            if phase["release"]:
                phase["pause"].release(held[0].name.removesuffix(".paused"))
        assert time.monotonic() < phase["deadline"], "hung"  # a guard against a hang, not a speed limit

    monkeypatch.setattr(executor.Display, "refresh", takes_over_once_held)

    def driven_until_taken_over(stage_run: str, take, release: bool, turns_allowed: float) -> TakenOver:
        phase.clear()
        phase.update(pause=Pause(tmp_path / stage_run, "epoch:1,epoch:2"), take=take, release=release,
                     turns_allowed=turns_allowed, deadline=time.monotonic() + 900)
        for key, value in phase["pause"].env({}).items():
            monkeypatch.setenv(key, value)  # the driver hands them to its workers
        stage = runner.Stage(stage_run, runtime.of(cfg), code_version=keys.code_version())
        try:
            with pytest.raises(TakenOver) as err:
                executor.run_children(cfg, stage, [executor.ChildSpec("held", cfg, "resnet")], dataset)
        finally:
            disconnect()
        assert "\n" not in str(err.value) and "taken over by elsewhere pid 4242" in str(err.value)
        return err.value

    theirs = server.client.create_run(experiment_id, run_name="theirs", tags={
        "mlflow.parentRunId": parent, lifecycle.HEARTBEAT: lifecycle.stamp(**elsewhere)}).info.run_id
    # the child checks its claims before epoch 2's record, however long that epoch takes
    taken = driven_until_taken_over(parent, take=lambda child: child, release=True, turns_allowed=float("inf"))
    assert taken.run_id == phase["held"]
    child = server.client.get_run(phase["held"])
    assert child.info.status == "RUNNING" and server.steps(phase["held"], "test_acc") == [1]
    assert server.client.get_run(theirs).info.status == "RUNNING"

    monkeypatch.setattr(executor, "WRITER_CHECK_S", 0.0)  # the driver asks at every turn of its loop
    real_check = lifecycle.check_still_writer

    def store_away_once_after_the_claim(run_id):  # a store it cannot read for a moment stops nothing
        if "taken" in phase and not phase.get("store_was_away"):
            phase["store_was_away"] = True
            raise MlflowException("the tracking server did not answer")
        return real_check(run_id)

    monkeypatch.setattr(lifecycle, "check_still_writer", store_away_once_after_the_claim)
    later = server.client.create_run(experiment_id, run_name="stage taken over").info.run_id
    taken = driven_until_taken_over(later, take=lambda child: later, release=False, turns_allowed=1)
    assert phase["store_was_away"]
    assert taken.run_id == later
    assert server.client.get_run(phase["held"]).info.status == "KILLED"
    assert server.steps(phase["held"], "test_acc") == [1]
    assert interrupts.killed_runs(taken) == []  # no "continue with the same command": the new writer does


def test_a_slot_is_refilled_as_soon_as_a_child_ends_never_more_than_slots_at_once(two_nodes, server, monkeypatch):
    """executor.stream with 2 slots and 4 children: 2 start, and each next one is asked for only
    when one has ended (whichever it is), so no slot idles while work is left."""
    from pipeline import executor, keys, runner, runtime

    cfg, dataset, parent = in_process_stage(server, two_nodes, monkeypatch)
    stage = runner.Stage(parent, runtime.of(cfg), code_version=keys.code_version())
    queue = iter([(n, executor.ChildSpec(f"point {n}", cfg.replace(seed=n), "resnet")) for n in range(4)])
    events = []

    def next_child():
        item = next(queue, None)
        events.append("ask" if item is not None else "none")
        return item

    try:
        executor.stream(cfg, stage, dataset, next_child, lambda key, result: events.append(f"done {key}"), 2)
    finally:
        disconnect()
    asks = [e for e in events if e == "ask"]
    assert len(asks) == 4 and sorted(e for e in events if e.startswith("done")) == [f"done {n}" for n in range(4)]
    in_flight = 0
    for event in events:
        in_flight += 1 if event == "ask" else -1 if event.startswith("done") else 0
        assert in_flight <= 2
    assert events[:2] == ["ask", "ask"] and events[2].startswith("done")  # the third waits for an end
    assert events[3] == "ask"  # and is asked for at once


def test_losing_the_progress_board_never_fails_a_child(two_nodes, server, monkeypatch):
    import ray

    from pipeline import executor, keys, runner, runtime

    cfg, dataset, parent = in_process_stage(server, two_nodes, monkeypatch, epochs="2")
    real_refresh = executor.Display.refresh

    def board_dies(self, *args, **kwargs):
        if self.board is not None and any(server.children(parent)):
            ray.kill(self.board)  # as a node losing the actor would
        real_refresh(self, *args, **kwargs)

    monkeypatch.setattr(executor.Display, "refresh", board_dies)
    stage = runner.Stage(parent, runtime.of(cfg), code_version=keys.code_version())
    try:
        (result,) = executor.run_children(cfg, stage, [executor.ChildSpec("point", cfg, "resnet")], dataset)
    finally:
        disconnect()
    run = server.client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and server.steps(result.run_id, "test_acc") == [1, 2]


def test_the_default_ray_is_private_even_beside_another_cluster(two_nodes, store):
    """ray_address="" starts a Ray of this command's own: never the cluster RAY_ADDRESS names, nor
    the newest one on this machine."""
    ray_env(store)["RAY_ADDRESS"] = two_nodes.address
    proc = store.mlflow_run("tune_lr", store.params({"init": "scratch", "lrs": "0.001", "epochs": "1",
                                                     "executor": "ray"}))
    (stage,) = store.top_level("tune_lr")
    (child,) = store.children(stage.info.run_id)
    assert child.data.tags["ray_node_id"] not in {n.node_id for n in two_nodes.list_all_nodes()}
    assert "ray: started a local Ray, 1 node(s)" in proc.stdout


# -- the cluster path: PostgreSQL under MLflow and Optuna, two nodes, faults ------------------------

def test_the_study_on_two_nodes_and_postgresql_through_a_killed_worker_and_a_server_outage(
        two_nodes, database, tmp_path, data_dir):
    """README's cluster recipe at toy size: `mlflow server` on PostgreSQL 15, Optuna's study in a
    database of its own there, `main -P executor=ray -P tuner=optuna` on two Ray nodes, through
    faults: a worker training a trial is SIGKILLed in its second epoch (Ray retries the task; the
    child resumes from last.pt), and the tracking server is stopped for 15 s as retrain's phase 1
    starts its second epoch (the worker's calls wait for it). The study finishes with a true record, and the same
    command again finds every stage's run in PostgreSQL and trains nothing. (One `main`, not a
    clean one first: that doubled the test's time, over half the suite's budget on a slow CPU.)"""
    backend = database.create_database("mlflow")
    optuna_url = database.create_database("optuna")
    with mlflow_server(tmp_path, data_dir, backend=backend) as store:
        params = store.params({"epochs": "2", "repeats": "1", "executor": "ray",
                               "ray_address": two_nodes.address, "tuner": "optuna", "n_trials": "2",
                               "optuna_storage": optuna_url})
        params.pop("bs")
        cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "main", "--env-manager", "local"]
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]

        # a trial's worker held once its epoch 1 is recorded (whatever its bs), killed
        # mid-trial; retrain's phase 1 held at its second batch (at phase1_bs 256 on 128
        # images: epoch 2's only one), the server stopped meanwhile
        pause = Pause(store.root / "pause", "epoch:1@autotune,batch:2@retrain")
        proc = subprocess.Popen(cmd, cwd=store.root, env=pause.env(ray_env(store)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            killed_pid, trial_child = pause.wait("epoch-1", proc, timeout=900)
            os.kill(killed_pid, signal.SIGKILL)  # a worker mid-trial; Ray retries its task
            _, _ = pause.wait("batch-2", proc, timeout=900)  # retrain phase 1, before epoch 2 trains
            store.server.stop()
            pause.release("batch-2")
            time.sleep(15)
            store.server.start()
            out, err = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, (out[-3000:], err[-5000:])
        runs = store.runs()
        assert runs and {r.info.status for r in runs} == {"FINISHED"}, \
            sorted((r.info.run_name, r.info.status) for r in runs if r.info.status != "FINISHED")
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert {c.data.tags["ray_node_id"] for c in children} == {n.node_id for n in two_nodes.list_all_nodes()}
        for child in children:  # what either node wrote reached the server, the outage's included
            assert child.info.artifact_uri.startswith("mlflow-artifacts:")
            assert {"checkpoints/best.pt", "config.yaml", "model_summary.txt", "plots/loss.png",
                    "plots/samples.png"} <= store.artifacts(child.info.run_id), child.info.run_name
            weights = store.checkpoint(child.info.run_id)
            assert weights and all(torch.isfinite(t.float()).all() for t in weights.values())
        chosen = [r for r in runs if "best_child_run_id" in r.data.tags]
        assert sorted(r.data.tags["stage"] for r in chosen) == sorted(CHAINS["optuna"])  # each stage holds its winner's
        for stage in chosen:
            best, winner = store.checkpoint(stage.info.run_id), store.checkpoint(stage.data.tags["best_child_run_id"])
            assert best.keys() == winner.keys() and all(torch.equal(best[k], winner[k]) for k in winner)
        for child in children:  # each epoch once, through the outage and the retry
            epochs = len(store.steps(child.info.run_id, "epoch_time_s"))
            assert store.steps(child.info.run_id, "test_acc") == list(range(1, epochs + 1)), child.info.run_name
        resumed = store.client.get_run(trial_child)
        assert resumed.info.status == "FINISHED" and resumed.data.tags["stage"] == "autotune"
        assert store.steps(trial_child, "test_acc") == [1, 2]
        assert int(parse_stamp(resumed.data.tags["heartbeat"])["pid"]) != killed_pid  # a retry finished it
        (main,) = store.top_level("main")
        autotune = store.client.get_run(main.data.tags["run_autotune"])
        assert resumed.data.tags["mlflow.parentRunId"] == autotune.info.run_id
        champion = store.client.get_model_version_by_alias("svhn-classifier-synthetic", "champion")
        registered = {store.client.get_run(main.data.tags[f"run_{s}"]).data.tags.get("registered_model_version")
                      for s in ("retrain", "deepen")}  # each registered a version of its own, through the server
        assert len(registered - {None}) == 2 and f"svhn-classifier-synthetic/{champion.version}" in registered
        assert champion.run_id in {main.data.tags["run_retrain"], main.data.tags["run_deepen"]}
        study = autotune.data.tags["optuna_study"]
        assert database.query("optuna", "SELECT study_name FROM studies") == [(study,)]  # in PostgreSQL
        assert autotune.data.tags["optuna_storage"].startswith("postgresql://postgres@127.0.0.1:")

        # the same command: every stage found FINISHED through the server, none trained again
        again = subprocess.Popen(cmd, cwd=store.root, env=ray_env(store), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = again.communicate(timeout=600)
        finally:
            if again.poll() is None:
                os.killpg(again.pid, signal.SIGKILL)
        assert again.returncode == 0, (out[-3000:], err[-5000:])
        assert (out + err).count("reusing FINISHED run") == len(CHAINS["optuna"]), out[-3000:]
        before = {r.info.run_id for r in runs}
        assert [r.data.tags.get("stage") for r in store.runs() if r.info.run_id not in before] == ["main"]
    states = database.query("optuna", "SELECT state FROM trials ORDER BY number")
    assert [state for (state,) in states] == ["COMPLETE"] * 2  # the killed worker's trial was never failed
