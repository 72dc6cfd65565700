"""`mlflow run --env-manager uv`: the project runs in an environment that uv builds from
conda.yaml's pinned pip section, without conda and without our .venv."""
import subprocess

import pytest

from support.store import PROJECT, VENV_BIN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_train_runs_in_an_environment_uv_builds_from_conda_yaml(store, tmp_path):
    env_root = tmp_path / "envs"
    env = {**store.env, "MLFLOW_ENV_ROOT": str(env_root)}
    # as `make demo ENV_MANAGER=uv` runs it: uv told where pip finds wheels (torch's, on this disk)
    cmd = [str(VENV_BIN / "python"), str(PROJECT / "scripts" / "demo.py"), "with-pip-sources",
           str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "train", "--env-manager", "uv"]
    for key, value in store.params({"epochs": "1", "limit_train": "128", "limit_test": "64"}).items():
        cmd += ["-P", f"{key}={value}"]
    proc = subprocess.run(cmd, cwd=store.root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    (venv,) = list(env_root.iterdir())  # the one environment uv built, named by conda.yaml's pins
    assert f"source {venv}/bin/activate && python -m pipeline train" in proc.stderr
    installed = {}  # name -> version of every distribution in the uv environment
    for info in (venv / "lib" / "python3.11" / "site-packages").glob("*.dist-info"):
        name, version = info.name.removesuffix(".dist-info").rsplit("-", 1)
        installed[name.lower().replace("_", "-")] = version
    pins = {line.strip(" -").split("==")[0].split("[")[0].lower(): line.split("==")[1].strip()
            for line in (PROJECT / "conda.yaml").read_text().splitlines() if "==" in line}
    assert pins and {name: installed.get(name) for name in pins} == pins

    (run,) = store.top_level("train")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.env"] == "uv"
    assert run.data.tags["env.torch"].startswith(pins["torch"])
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert store.steps(run.info.run_id, key) == [1], key
    assert {"checkpoints/best.pt", "config.yaml"} <= store.artifacts(run.info.run_id)
