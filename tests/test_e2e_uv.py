"""`mlflow run --env-manager uv`: the project runs in an environment that uv builds from
conda.yaml's pinned pip section, without conda and without our .venv."""
import os
import subprocess

import pytest

from support.store import PROJECT, VENV_BIN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# pip's settings and the uv variables that say the same thing (uv never reads pip's config)
PIP_TO_UV = {"index-url": "UV_DEFAULT_INDEX", "extra-index-url": "UV_INDEX",
             "find-links": "UV_FIND_LINKS", "constraint": "UV_CONSTRAINT"}


def uv_sources_from_pip() -> dict[str, str]:
    """Where pip finds wheels here (its config files and PIP_* variables), told to uv, so that
    uv installs what pip would: on a machine with torch's wheels on disk, those, not a 3 GB
    download. Any UV_* variable already set wins."""
    listed = subprocess.run([str(VENV_BIN / "python"), "-m", "pip", "config", "list"],
                            capture_output=True, text=True, timeout=60).stdout
    found: dict[str, str] = {}
    for line in listed.splitlines():  # e.g. global.extra-index-url='file:///a/simple file:///b/simple'
        key, _, value = line.partition("=")
        uv_name = PIP_TO_UV.get(key.rsplit(".", 1)[-1])
        if uv_name and uv_name not in found:
            found[uv_name] = value.strip().strip("'\"")
    if "UV_FIND_LINKS" in found:  # pip separates them with spaces, uv with commas
        found["UV_FIND_LINKS"] = ",".join(found["UV_FIND_LINKS"].split())
    if "UV_INDEX" in found:
        found["UV_INDEX_STRATEGY"] = "unsafe-best-match"  # pip's rule: best version over all indexes
    return {key: value for key, value in found.items() if key not in os.environ}


def test_train_runs_in_an_environment_uv_builds_from_conda_yaml(store, tmp_path):
    env_root = tmp_path / "envs"
    env = {**store.env, **uv_sources_from_pip(), "MLFLOW_ENV_ROOT": str(env_root)}
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "train", "--env-manager", "uv"]
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
