"""Against a real `mlflow server` (SQLite backend, proxied artifacts): register, predict, serve."""
import csv
import json
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import VENV_BIN, Store
from pipeline import registry
from pipeline.data import read_mat

pytestmark = pytest.mark.e2e


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


@pytest.fixture(scope="module")
def server_store(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        store = Store(root, data_dir)
        store.uri = f"http://127.0.0.1:{port}"
        store.env["MLFLOW_TRACKING_URI"] = store.uri
        store.mlflow_run("retrain", store.params({"max_epochs": "1"}))
        yield store
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def png_folder(server_store, tmp_path_factory):
    """20 PNGs cut from the synthetic test split, upscaled, plus one corrupt file."""
    folder = tmp_path_factory.mktemp("pngs")
    test_mat = next(server_store.data_dir.glob("*/test_32x32.mat"))
    images, labels = read_mat(test_mat, "test", verify=False)
    truth = {}
    for i in range(20):
        name = f"img{i:02d}.png"
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((64, 64)).save(folder / name)
        truth[name] = int(labels[i])
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder, truth


def test_retrain_registers_a_champion_with_artifacts_on_the_server(server_store):
    (run,) = server_store.top_level("retrain")
    version = server_store.client.get_model_version_by_alias("svhn-classifier", "champion")
    assert version.run_id == run.info.run_id
    assert float(version.tags["best_test_acc"]) == run.data.metrics["best_test_acc"]
    artifacts = server_store.artifacts(run.info.run_id)
    assert {"checkpoints/best.pt", "evaluation/confusion_matrix.png", "evaluation/per_digit_accuracy.md",
            "evaluation/per_digit_accuracy.png", "evaluation/misclassified.png"} <= artifacts
    assert "test_acc_digit_0" in run.data.metrics
    assert list((server_store.root / "artifacts").rglob("best.pt"))  # proxied to the server's store


def test_champion_loads_in_a_fresh_process_without_the_project_source(server_store, tmp_path):
    code = (
        "import importlib.util, numpy as np, torch, mlflow\n"
        "assert importlib.util.find_spec('pipeline') is None\n"
        "uri = 'models:/svhn-classifier@champion'\n"
        "x = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)\n"
        "a = mlflow.pytorch.load_model(uri)(torch.from_numpy(x)).detach().numpy()\n"
        "b = mlflow.pyfunc.load_model(uri).predict(x)\n"
        "assert a.shape == (3, 10) and np.allclose(a, b, atol=1e-5) and np.allclose(a.sum(1), 1, atol=1e-4)\n"
        "print('ok')\n")
    env = dict(server_store.env)
    env.pop("PYTHONPATH", None)
    # -I -S: neither the working directory, PYTHONPATH nor .pth files (the editable install of
    # this project is one) reach sys.path; only the installed packages' folder is added
    site_packages = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c",
                           f"import sys; sys.path.append({site_packages!r})\n" + code],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_predict_folder_reports_the_corrupt_file_and_labels_the_rest(server_store, png_folder, tmp_path):
    folder, truth = png_folder
    output = tmp_path / "p.csv"
    proc = server_store.mlflow_run("predict", {"input": str(folder), "output": str(output)}, check=False)
    assert proc.returncode != 0  # some inputs failed
    assert "cannot read image" in proc.stdout and "broken.png" in proc.stdout
    rows = list(csv.DictReader(open(output)))
    assert len(rows) == 20 and {r["input"] for r in rows} == set(truth)
    assert all(0 <= int(r["label"]) <= 9 and 0 <= float(r["confidence"]) <= 1 for r in rows)
    agree = sum(int(r["label"]) == truth[r["input"]] for r in rows)
    acc = server_store.client.get_model_version_by_alias("svhn-classifier", "champion").tags["best_test_acc"]
    p = float(acc) / 100
    assert agree >= 20 * p - 3 * (20 * p * (1 - p)) ** 0.5 - 1  # within noise of the logged accuracy
    (run,) = server_store.top_level("predict")
    assert "p.csv" in server_store.artifacts(run.info.run_id)


def test_predict_on_a_labelled_mat_reports_accuracy(server_store, tmp_path):
    test_mat = next(server_store.data_dir.glob("*/test_32x32.mat"))
    proc = server_store.cli("predict", "--input", str(test_mat), "--output", str(tmp_path / "m.csv"),
                            check=True)
    assert "accuracy on 300 labelled images" in proc.stdout
    assert len(list(csv.DictReader(open(tmp_path / "m.csv")))) == 300


def test_a_worse_model_leaves_the_champion_where_it_was(server_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_store.uri)
    from pipeline import config, data, runner

    (run,) = server_store.top_level("retrain")
    before = server_store.client.get_model_version_by_alias("svhn-classifier", "champion").version
    cfg = config.load("retrain", {"dataset": "synthetic", "data_dir": str(server_store.data_dir),
                                  "synthetic_train": "600", "synthetic_test": "300", "limit_test": "8"})
    worse = runner.RunResult(run.info.run_id, "worse", "resnet", -1.0, 1, None)
    new_version = registry.register(run.info.run_id, cfg, worse, data.load(cfg))
    assert new_version != before
    assert server_store.client.get_model_version_by_alias("svhn-classifier", "champion").version == before


def test_mlflow_models_serve_answers_invocations(server_store, png_folder):
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m",
                             "models:/svhn-classifier@champion", "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=server_store.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        folder, truth = png_folder
        names = sorted(truth)[:4]
        images = [np.asarray(Image.open(folder / n).convert("RGB").resize((32, 32))).tolist() for n in names]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=60))
        probabilities = np.array(answer["predictions"])
        assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
