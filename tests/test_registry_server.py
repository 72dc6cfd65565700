"""Against a real `mlflow server` (SQLite backend, proxied artifacts): register, predict, serve."""
import csv
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
from PIL import Image

from support.digits import colour_params, constant_model_run
from support.processes import mlflow_server, model_server
from support.store import kept_if_failed
from pipeline import batching, models, registry, runner
from pipeline.data import read_mat
from pipeline.predict import read_image

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server_store(request, tmp_path_factory, data_dir, colour_data):
    with kept_if_failed(request, tmp_path_factory.mktemp("server")) as root, mlflow_server(root, data_dir) as store:
        # colour-coded digits, which the model learns in two epochs: its predictions mean something
        store.mlflow_run("retrain", colour_params(store, colour_data, "right", {
            "max_epochs": "2", "phase1_lr": "1e-4", "phase1_bs": "32"}))
        yield store


@pytest.fixture(scope="module")
def test_mat(colour_data):
    return colour_data / "right" / "test_32x32.mat"


@pytest.fixture(scope="module")
def test_split(test_mat):
    """The test split the model was trained against, as SVHN stores it: (N,32,32,3) uint8, labels."""
    images, labels = read_mat(test_mat, "test", verify=False)
    return images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy()


@pytest.fixture(scope="module")
def reference(server_store):
    """Probabilities from the training-time evaluation path, in this process: the champion's
    best.pt in its arch, the seed's test transform (CenterCrop(28), ToTensor, Normalize)."""
    version = server_store.client.get_model_version_by_alias("svhn-classifier", "champion")
    net = models.build(version.tags["arch"])
    state = server_store.checkpoint(version.run_id)
    net.load_state_dict(state)
    net.eval()

    def probabilities(nhwc: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(nhwc)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return torch.softmax(net(batching.normalise(batching.center_crop(x))), dim=1).numpy()

    return probabilities


def assert_same_predictions(got, expected):
    assert got.shape == expected.shape
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert np.allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def png_folder(server_store, tmp_path_factory, test_split):
    """20 PNGs cut from the test split, upscaled, plus one corrupt file."""
    folder = tmp_path_factory.mktemp("pngs")
    images, labels = test_split
    truth = {}
    for i in range(20):
        name = f"img{i:02d}.png"
        Image.fromarray(images[i]).resize((64, 64)).save(folder / name)
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
    assert list((server_store.root / "artifacts").rglob("best.pt"))  # proxied to the server's store


def test_evaluation_report_scores_the_registered_model(server_store, test_split, reference):
    (run,) = server_store.top_level("retrain")
    images, labels = test_split
    predicted = reference(images).argmax(1)
    metrics = run.data.metrics
    assert metrics["eval_test_acc"] == pytest.approx(100.0 * np.mean(predicted == labels))
    # the registered model is the best checkpoint: it scores the logged best test accuracy (fp32 both)
    assert metrics["eval_test_acc"] == metrics["best_test_acc"] >= 80
    for digit in range(10):
        mine = labels == digit
        assert metrics[f"test_acc_digit_{digit}"] == pytest.approx(100.0 * np.mean(predicted[mine] == digit))


def test_champion_loads_in_a_fresh_process_without_the_project_source(server_store, tmp_path, test_split,
                                                                     reference):
    images, _ = test_split
    np.save(tmp_path / "x.npy", images)
    code = (
        "import importlib.util, numpy as np, torch, mlflow\n"
        "assert importlib.util.find_spec('pipeline') is None\n"
        "uri = 'models:/svhn-classifier@champion'\n"
        "x = np.load('x.npy')\n"
        "import os; os.mkdir('torch-model'); os.mkdir('pyfunc-model')\n"  # MLflow's default: a temp folder it keeps
        "np.save('torch.npy', mlflow.pytorch.load_model(uri, dst_path='torch-model')(torch.from_numpy(x))"
        ".detach().numpy())\n"
        "np.save('pyfunc.npy', mlflow.pyfunc.load_model(uri, dst_path='pyfunc-model').predict(x))\n"
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
    expected = reference(images)
    assert_same_predictions(np.load(tmp_path / "torch.npy"), expected)
    assert_same_predictions(np.load(tmp_path / "pyfunc.npy"), expected)


def test_predict_folder_reports_the_corrupt_file_and_labels_the_rest(server_store, png_folder, tmp_path,
                                                                     reference):
    folder, truth = png_folder
    output = tmp_path / "p.csv"
    proc = server_store.mlflow_run("predict", {"input": str(folder), "output": str(output)}, check=False)
    assert proc.returncode != 0  # some inputs failed
    assert "cannot read image" in proc.stdout and "broken.png" in proc.stdout
    rows = list(csv.DictReader(open(output)))
    assert [r["input"] for r in rows] == sorted(truth)
    expected = reference(np.stack([read_image(folder / r["input"]) for r in rows]))  # resized to 32x32
    assert [int(r["label"]) for r in rows] == expected.argmax(1).tolist()
    assert np.allclose([float(r["confidence"]) for r in rows], expected.max(1), atol=5.1e-5)
    (run,) = server_store.top_level("predict")
    assert "p.csv" in server_store.artifacts(run.info.run_id)
    name, version = run.data.tags["model_uri"].removeprefix("models:/").split("/")  # @champion, pinned
    assert version == server_store.client.get_model_version_by_alias(name, "champion").version


def test_predict_on_a_labelled_mat_reports_accuracy(server_store, tmp_path, test_mat, test_split, reference):
    proc = server_store.cli("predict", "--input", str(test_mat), "--output", str(tmp_path / "m.csv"),
                            check=True)
    images, labels = test_split
    predicted = reference(images).argmax(1)
    assert f"accuracy on 128 labelled images: {100.0 * np.mean(predicted == labels):.3f}%" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert [r["input"] for r in rows] == [f"test_32x32.mat[{i}]" for i in range(128)]
    assert [int(r["label"]) for r in rows] == predicted.tolist()


def test_a_worse_model_leaves_the_champion_where_it_was(server_store, colour_data, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_store.uri)
    from pipeline import config, data

    before = server_store.client.get_model_version_by_alias("svhn-classifier", "champion")
    # the champion's own data (the same digest), so the two are compared on the same test split
    cfg = config.load("retrain", {"dataset": "svhn", "verify": "false", "data_dir": str(colour_data / "right"),
                                  "limit_train": "256", "limit_test": "128"})
    dataset = data.load(cfg)
    assert dataset.digest == before.tags["data_digest"]
    run_id = constant_model_run(server_store, 0, dataset.digest)  # always 0: 10% of the test split
    worse = runner.RunResult(run_id, "worse", "resnet", 100.0, 1, None, "test", 100.0)  # whatever it logged
    new_version = registry.register(run_id, cfg, worse, dataset, [])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    champion_acc = float(before.tags["judged_acc"])
    assert f"version {new_version} 10.156% vs champion version {before.version} {champion_acc:.3f}%" in line
    assert server_store.client.get_model_version_by_alias("svhn-classifier", "champion").version == before.version


def test_mlflow_models_serve_answers_invocations(server_store, test_split, reference):
    with model_server(server_store, "models:/svhn-classifier@champion") as invoke:
        images = test_split[0][:32]
        predictions = np.array(invoke(images), dtype=np.float32)
    assert_same_predictions(predictions, reference(images))
