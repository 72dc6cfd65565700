"""Shared fixtures: a temporary tracking store, tiny synthetic data, and real `mlflow run` calls."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two test processes on two cores:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread each, children included

import torch  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# Tiny synthetic data: a few hundred images, so a whole stage takes seconds on 2 cores.
TINY = {"dataset": "synthetic", "limit_train": "256", "limit_test": "128", "bs": "64",
        "synthetic_train": "600", "synthetic_test": "300", "log_every": "1000"}


def base_env(tracking_uri: str, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # `mlflow run --env-manager local` runs the entry point's `python` from PATH: ours first
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["SVHN_TEST_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    return env


class Store:
    """A temporary SQLite tracking store and helpers to drive and inspect it."""

    def __init__(self, root: Path, data_dir: Path):
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.data_dir = data_dir
        self.env = base_env(self.uri, data_dir)

    def initialise(self) -> "Store":
        """Create the schema once (processes that create it at the same moment can collide), its
        artifacts under the store's folder, not the checkout's ./mlruns."""
        from pipeline.tracking import new_local_store

        self.uri = self.env["MLFLOW_TRACKING_URI"] = new_local_store(self.root)
        return self

    def params(self, extra: dict[str, str] | None = None, tiny: bool = True) -> dict[str, str]:
        params = dict(TINY, data_dir=str(self.data_dir)) if tiny else {}
        params.update(extra or {})
        return params

    def mlflow_run(self, entry: str, params: dict[str, str], check: bool = True, timeout: int = 600,
                   **popen) -> subprocess.CompletedProcess:
        cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", entry, "--env-manager", "local"]
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **popen)
        if check and proc.returncode != 0:
            raise AssertionError(f"mlflow run -e {entry} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def cli(self, *args: str, check: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=PROJECT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pipeline {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, filter_string: str = "") -> list:
        return self.client.search_runs(["0"], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"], max_results=500)

    def top_level(self, stage: str) -> list:
        return [r for r in self.runs(f"tags.stage = '{stage}'")
                if "mlflow.parentRunId" not in r.data.tags]

    def children(self, run_id: str) -> list:
        return self.runs(f"tags.mlflow.parentRunId = '{run_id}'")

    def steps(self, run_id: str, key: str) -> list[int]:
        return sorted(m.step for m in self.client.get_metric_history(run_id, key))

    def artifacts(self, run_id: str, path: str | None = None) -> set[str]:
        found = set()
        for info in self.client.list_artifacts(run_id, path):
            found |= self.artifacts(run_id, info.path) if info.is_dir else {info.path}
        return found


class Pause:
    """Holds the processes a test starts at pipeline/pause.py's points (SVHN_PAUSE_AT), so a test
    acts at a known place whatever this machine's speed: wait() for a process to be held there,
    release() it (or kill it)."""

    def __init__(self, folder: Path, spec: str):
        self.folder, self.spec = folder, spec
        folder.mkdir(parents=True, exist_ok=True)

    def env(self, env: dict[str, str]) -> dict[str, str]:
        return dict(env, SVHN_PAUSE_AT=self.spec, SVHN_PAUSE_DIR=str(self.folder))

    def wait(self, stem: str, proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
        """(pid, run id) of the process held at `stem` ("epoch-2", "takeover-1", ...)."""
        marker = self.folder / f"{stem}.paused"
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"never held at {stem}"
            time.sleep(0.05)
        pid, _, run_id = marker.read_text().strip().partition(" ")
        return int(pid), run_id

    def release(self, stem: str) -> None:
        (self.folder / f"{stem}.go").touch()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} never answered")


@contextlib.contextmanager
def mlflow_server(root: Path, data_dir: Path, *options: str, env: dict[str, str] | None = None):
    """A real `mlflow server` on loopback (SQLite backend, proxied artifacts) and a Store on it."""
    store = Store(root, data_dir)
    port = free_port()
    store.uri = store.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", *options, "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        cwd=root, env=dict(store.env, **(env or {})), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"{store.uri}/health", proc)
        yield store
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def store(tmp_path, data_dir) -> Store:
    return Store(tmp_path, data_dir).initialise()


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, data_dir) -> Store:
    return Store(tmp_path_factory.mktemp("store"), data_dir).initialise()


# -- colour-coded digits: SVHN-format data a model learns in two epochs -----------------------------

def colour_images(count, seed):
    """SVHN-format images a resnet learns within two epochs: each digit its own colour, plus noise."""
    labels = np.arange(count) % 10
    palette = np.random.default_rng(0).integers(0, 256, (10, 3))
    noise = np.random.default_rng(seed).normal(0, 20, (32, 32, 3, count))
    images = np.clip(palette[labels].T[None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """Two SVHN-format folders with the same images: `right` labels, and `shifted`, whose training
    labels are each digit plus one, so training on it makes the test accuracy fall."""
    from pipeline import synthetic

    root = tmp_path_factory.mktemp("colours")
    train_images, train_labels = colour_images(256, 1)
    test_images, test_labels = colour_images(128, 2)
    for name, labels in (("right", train_labels), ("shifted", (train_labels + 1) % 10)):
        synthetic.write_mat(root / name / "train_32x32.mat", train_images, svhn_labels(labels))
        synthetic.write_mat(root / name / "test_32x32.mat", test_images, svhn_labels(test_labels))
    return root


def svhn_labels(digits):
    return np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]


def colour_params(store, colour_data, folder, extra):
    # cpu and fp32, so this process can repeat the run's evaluation exactly
    return store.params({"dataset": "svhn", "verify": "false", "data_dir": str(colour_data / folder),
                         "device": "cpu", "precision": "fp32", "bs": "32", **extra})


def constant_model_run(store, digit: int, lineage: str, stage: str = "smoke") -> str:
    """A run (in this process's tracking store, which must be `store`'s) whose best.pt answers
    `digit` for every image: its accuracy is that digit's share. `lineage`: the data its weights
    descend from (a stage run's lineage_digest)."""
    from pipeline import checkpoints, models

    net = models.build("resnet")
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.fill_(-10.0)
        net.fc.bias[digit] = 10.0
    experiment = store.client.get_experiment_by_name("Default").experiment_id
    run_id = store.client.create_run(experiment, tags={"stage": stage, "lineage_digest": lineage}).info.run_id
    checkpoints.save_checkpoint(run_id, checkpoints.BEST, net.state_dict())
    return run_id


class Tiny(torch.nn.Module):
    """A linear model for train.fit's unit tests: it learns `batches` in a few epochs."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(x)


def batches(seed, n=64, bs=16):
    """Tiny's task; bs=24 leaves a short last batch (a second static shape for torch.compile)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() * 3  # learnable: class 0 or 3
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
