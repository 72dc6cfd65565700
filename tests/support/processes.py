"""Processes a test starts: held at pause points, a free port, a real `mlflow server`, a real
`mlflow models serve`."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from support.store import VENV_BIN, Store

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


@contextlib.contextmanager
def refusing_port():
    """A port on 127.0.0.1 held (bound, never listening) while the block runs: a connection to it is
    refused, and no other process can start a server on it meanwhile, as one could on a free_port()."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


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


class MlflowServer:
    """A real `mlflow server` on loopback with proxied artifacts; stop() and start() again on the
    same port (an outage, as a client sees it: connections refused)."""

    def __init__(self, root: Path, backend: str, port: int, options: tuple[str, ...], env: dict[str, str]):
        self.root, self.backend, self.port, self.options, self.env = root, backend, port, options, env
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", *self.options, "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend, "--artifacts-destination", str(self.root / "artifacts"),
             "--workers", "1"],
            cwd=self.root, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.uri}/health", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(root: Path, data_dir: Path, *options: str, env: dict[str, str] | None = None,
                  backend: str = ""):
    """A real `mlflow server` on loopback (SQLite backend unless `backend` names another, proxied
    artifacts) and a Store on it; the Store's `server` can stop and start it again."""
    store = Store(root, data_dir)
    server = MlflowServer(root, backend or f"sqlite:///{root / 'server.db'}", free_port(), options,
                          dict(store.env, **(env or {})))
    store.uri = store.env["MLFLOW_TRACKING_URI"] = server.uri
    store.server = server
    server.start()
    try:
        yield store
    finally:
        server.stop()


@contextlib.contextmanager
def model_server(store: Store, model_uri: str):
    """`mlflow models serve` (local env, loopback) of `model_uri` from `store`; yields a function
    that posts images (N, H, W, C) to /invocations and returns the predictions. The model it
    downloads lands in the store's TMPDIR, which MLflow never cleans up itself."""
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=store.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def invoke(images) -> list:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(request, timeout=60))["predictions"]

    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        yield invoke
    finally:
        proc.terminate()
        proc.wait(timeout=30)
