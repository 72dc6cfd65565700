"""Processes a test starts: held at pause points, a free port, a real `mlflow server`."""
from __future__ import annotations

import contextlib
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
