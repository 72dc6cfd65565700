"""A temporary tracking store and real `mlflow run` / `python -m pipeline` calls against it."""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent.parent
VENV_BIN = Path(sys.executable).parent

# Tiny synthetic data: 128 training images (an epoch is mostly training, even here: 5.6 s of a
# tune_lr child at 256 on an AVX2-only CPU in fp32), so a whole stage takes seconds on 2 cores.
TINY = {"dataset": "synthetic", "limit_train": "128", "limit_test": "64", "bs": "64",
        "synthetic_train": "600", "synthetic_test": "300", "log_every": "1000"}


@contextlib.contextmanager
def kept_if_failed(request, folder: Path):
    """`folder` for a module's shared fixture, removed after the module unless one of its tests
    failed: what tmp_path_retention_policy = "failed" does for a test's own tmp_path. A study's
    stores hold gigabytes of checkpoints (a MyVgg one is 171 MB), and a full disk fails every test."""
    failed = request.session.testsfailed
    yield folder  # an error in the fixture itself raises here: the folder is kept
    if request.session.testsfailed == failed:
        shutil.rmtree(folder, ignore_errors=True)


def base_env(tracking_uri: str, data_dir: Path, root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # what the processes leave in the temporary folder goes with the store's folder: `mlflow run`
    # makes an empty folder there on every call and never removes it (119 in one CI run), and
    # MLflow's SQLite lock files. Ray keeps the usual one: its socket paths must stay short.
    env["RAY_TMPDIR"] = env.get("RAY_TMPDIR") or tempfile.gettempdir()
    env["TMPDIR"] = str(root / "tmp")
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    # `mlflow run --env-manager local` runs the entry point's `python` from PATH: ours first
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["SVHN_TEST_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    # pytest sets this, and MLflow reads it as "under test": its SQL store turns on checks of its
    # own. The processes a test starts run as a user's do, without MLflow's usage telemetry,
    # which the same variable also turned off.
    env.pop("PYTEST_CURRENT_TEST", None)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


class Store:
    """A temporary SQLite tracking store and helpers to drive and inspect it."""

    def __init__(self, root: Path, data_dir: Path):
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.data_dir = data_dir
        self.env = base_env(self.uri, data_dir, root)

    def initialise(self, template: Path | None = None) -> "Store":
        """Create the schema once (processes that create it at the same moment can collide), its
        artifacts under the store's folder, not the checkout's ./mlruns. With `template`, a store
        that new_local_store made (`template_store`): a copy of it, with its Default experiment's
        artifacts moved here, is the same fresh store without MLflow's 2-3 s of migrations."""
        from pipeline.tracking import new_local_store

        if template is None:
            self.uri = new_local_store(self.root)
        else:
            database = self.root / "mlflow.db"
            shutil.copyfile(template / "mlflow.db", database)
            with contextlib.closing(sqlite3.connect(database)) as db, db:
                (location,) = db.execute("SELECT artifact_location FROM experiments").fetchone()
                assert location == str(template.resolve() / "mlruns" / "0"), location  # nothing else to move
                db.execute("UPDATE experiments SET artifact_location = ?", (str(self.root.resolve() / "mlruns" / "0"),))
            self.uri = f"sqlite:///{database.resolve()}"
        self.env["MLFLOW_TRACKING_URI"] = self.uri
        return self

    def params(self, extra: dict[str, str] | None = None, tiny: bool = True) -> dict[str, str]:
        params = dict(TINY, data_dir=str(self.data_dir)) if tiny else {}
        params.update(extra or {})
        if params.get("dataset") == "svhn":  # TINY's sizes of synthetic data: refused for SVHN's files
            params = {k: v for k, v in params.items() if k not in ("synthetic_train", "synthetic_test")}
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

    def download(self, run_id: str, path: str) -> Path:
        """A fresh local copy of one artifact, under the store's own folder: MLflow's default
        destination is a temporary folder it never removes (a MyVgg checkpoint is 171 MB)."""
        folder = self.root / "downloads"
        folder.mkdir(exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, tempfile.mkdtemp(dir=folder)))

    def checkpoint(self, run_id: str, path: str = "checkpoints/best.pt") -> dict:
        """A checkpoint as torch.load reads it with weights_only: best.pt's weights, or last.pt."""
        import torch

        return torch.load(self.download(run_id, path), weights_only=True)

    def artifacts(self, run_id: str, path: str | None = None) -> set[str]:
        found = set()
        for info in self.client.list_artifacts(run_id, path):
            found |= self.artifacts(run_id, info.path) if info.is_dir else {info.path}
        return found
