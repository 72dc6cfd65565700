"""Nothing in a run store runs code: crafted checkpoints are refused unread, the pipeline works
with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, and bad images and .mat files are skipped in one line."""
import csv
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from PIL import Image

from pipeline import checkpoints, data, predict, registry, runner, synthetic, train
from pipeline.errors import CheckpointError, DataError, PredictError
from support.processes import model_server
from support.store import TINY

MODEL_NAME = "svhn-no-pickle"


class RunsCode:
    """Unpickling this creates `marker`: what an attacker would plant as last.pt."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "epoch": 1, "history": RunsCode(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(module_store):
    """A real 2-epoch `train` run killed (SIGKILL) after its first epoch, so it holds a real
    last.pt (a run that finishes drops it); pickle deserialisation switched off throughout."""
    import os
    import signal
    import subprocess

    from support.processes import Pause
    from support.store import PROJECT, VENV_BIN

    module_store.env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    cmd = [str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "train", "--env-manager", "local"]
    for key, value in module_store.params({"epochs": "2"}).items():
        cmd += ["-P", f"{key}={value}"]
    pause = Pause(module_store.root / "pause", "epoch:1")  # held once epoch 1's record is written
    proc = subprocess.Popen(cmd, cwd=module_store.root, env=pause.env(module_store.env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _, run_id = pause.wait("epoch-1", proc)
        assert module_store.steps(run_id, "test_acc") == [1]
        assert "checkpoints/last.pt" in module_store.artifacts(run_id)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    (run,) = module_store.top_level("train")
    return module_store, run.info.run_id


def plant(store, source_run_id: str, artifact: str, payload: Path) -> str:
    """A KILLED run shaped like `source_run_id` (config, arch) whose `artifact` is `payload`."""
    client = store.client
    source = client.get_run(source_run_id)
    run = client.create_run(source.info.experiment_id, tags={"arch": "resnet", "stage": "train"})
    run_id = run.info.run_id
    config_text = store.download(source_run_id, "config.yaml").read_text()
    client.log_text(run_id, config_text, "config.yaml")
    target = payload.parent / Path(artifact).name
    if payload != target:
        target.write_bytes(payload.read_bytes())
    client.log_artifact(run_id, str(target), str(Path(artifact).parent))
    client.set_terminated(run_id, "KILLED")
    return run_id


@pytest.mark.e2e  # a real `mlflow run` first
def test_a_last_pt_that_would_run_code_is_refused_unread(trained, tmp_path):
    store, source = trained
    probe = tmp_path / "probe"  # the payload really runs code when unpickled the old way
    torch.load(crafted_checkpoint(tmp_path / "probe.pt", probe), weights_only=False)
    assert probe.exists()

    marker = tmp_path / "marker"
    run_id = plant(store, source, checkpoints.LAST, crafted_checkpoint(tmp_path / "last.pt", marker))
    proc = store.cli("train", "--resume_run_id", run_id)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert run_id in lines[0] and "checkpoints/last.pt" in lines[0] and "posix.system" in lines[0]
    assert not marker.exists()
    assert store.client.get_run(run_id).info.status == "KILLED"  # nothing was changed


def pt2_model_that_unpickles(folder: Path, marker: Path) -> Path:
    """A pt2 model saved by MLflow, then altered as an attacker with write access to the store
    would: its first weight marked `use_pickle` and replaced by a pickle that creates `marker`."""
    import json
    import zipfile

    import mlflow

    model = folder / "model"
    mlflow.pytorch.save_model(torch.nn.Linear(3, 2), str(model), serialization_format="pt2",
                              input_example=np.zeros((2, 3), np.float32))
    archive = model / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as zipped:
        records = {name: zipped.read(name) for name in zipped.namelist()}
    (config_name,) = [name for name in records if name.endswith("weights/model_weights_config.json")]
    config = json.loads(records[config_name])
    (first,) = [entry for entry in config["config"].values() if entry["path_name"] == "weight_0"]
    first["use_pickle"] = True
    records[config_name] = json.dumps(config).encode()
    payload = folder / "payload.pt"
    torch.save(RunsCode(marker), payload)
    records[config_name.replace("model_weights_config.json", "weight_0")] = payload.read_bytes()
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, content in records.items():
            zipped.writestr(name, content)
    return model


def test_a_script_that_imports_the_pipeline_loads_no_pickle_from_a_pt2_model(tmp_path):
    """MLflow 3.17 unpickles by default, and our CLI is not the only caller: a script that imports
    the pipeline and loads a model gets MLflow's pickle check too (unless it set the variable)."""
    import subprocess
    import sys

    from support.store import PROJECT

    marker = tmp_path / "marker"
    model = pt2_model_that_unpickles(tmp_path, marker)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"}
    load = "import sys; from pipeline import registry; registry.load_pt2(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", load, str(model)], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "is not a pickle-free payload" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    trusting = dict(env, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="true")  # the payload is real: set true, it runs
    subprocess.run([sys.executable, "-c", load, str(model)], cwd=PROJECT, env=trusting, capture_output=True,
                   timeout=300)
    assert marker.exists()


def malformed(kind: str, real_last: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "raw_pickle":  # a plain pickle, not torch's zip format
        import pickle

        path.write_bytes(pickle.dumps({"epoch": 1, "x": RunsCode(tmp_path / "marker")}, protocol=4))
    elif kind == "truncated":
        path.write_bytes(real_last.read_bytes()[:2000])
    elif kind == "missing_keys":
        state = torch.load(real_last, weights_only=True)
        del state["optimizer"]
        torch.save(state, path)
    elif kind == "not_a_number":
        state = torch.load(real_last, weights_only=True)
        state["history"]["epochs"][0]["test_acc"] = torch.zeros(3)
        torch.save(state, path)
    elif kind == "cuda_rng":  # a GPU's RNG state that no GPU could take (checked on a CPU too)
        state = torch.load(real_last, weights_only=True)
        state["rng"]["cuda"] = [torch.zeros(4, dtype=torch.float32)]
        torch.save(state, path)
    elif kind in ("float_epoch", "float_history_epoch"):  # 1.0 == 1 passes a comparison, then fails range()
        state = torch.load(real_last, weights_only=True)
        if kind == "float_epoch":
            state["epoch"] = float(state["epoch"])
        else:
            state["history"]["epochs"][-1]["epoch"] = float(state["history"]["epochs"][-1]["epoch"])
        torch.save(state, path)
    elif kind == "older_format":  # what the previous version wrote: pickled History objects
        state = torch.load(real_last, weights_only=True)
        state.pop("format")
        state["history"] = train.History.from_state(state["history"])
        torch.save(state, path)
    return path


@pytest.mark.e2e  # a real `mlflow run` first
@pytest.mark.parametrize("kind,expected", [
    ("raw_pickle", "is not plain data"), ("truncated", "is not a readable checkpoint"),
    ("missing_keys", "is malformed (KeyError: 'optimizer')"),
    ("not_a_number", "is malformed (ValueError: EpochResult.test_acc is a Tensor"),
    ("cuda_rng", "is malformed (ValueError: rng cuda state [tensor([0., 0., 0., 0.])] is not one device's state "
                 "(a list of one byte tensor))"),
    ("float_epoch", "is malformed (ValueError: epoch 1.0 is not a whole number from 1)"),
    ("float_history_epoch", "is malformed (ValueError: EpochResult.epoch is 1.0, not of type int)"),
    ("older_format", "older format (it pickles pipeline.train.History)")])
def test_a_malformed_last_pt_is_one_line_naming_run_and_file(trained, tmp_path, monkeypatch, kind, expected):
    store, source = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    real_last = Path(store.client.download_artifacts(source, checkpoints.LAST, str(tmp_path)))
    run_id = plant(store, source, checkpoints.LAST, malformed(kind, real_last, tmp_path))
    with pytest.raises(CheckpointError) as err:
        checkpoints.resume_state(run_id, "resnet")
    message = str(err.value)
    assert "\n" not in message and f"run {run_id}: checkpoints/last.pt" in message
    assert expected in message
    assert not (tmp_path / "marker").exists()


@pytest.mark.e2e  # a real `mlflow run` first
def test_a_parent_best_pt_that_does_not_load_is_one_line(trained, tmp_path, monkeypatch):
    store, source = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    marker = tmp_path / "marker"
    run_id = plant(store, source, checkpoints.BEST, crafted_checkpoint(tmp_path / "best.pt", marker))
    with pytest.raises(CheckpointError) as err:
        checkpoints.parent_state(run_id)
    assert f"run {run_id}: checkpoints/best.pt is not plain data" in str(err.value)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.e2e  # a real `mlflow run` first
def test_resume_predict_and_serve_without_pickle_deserialisation(trained, tmp_path, monkeypatch):
    store, run_id = trained
    assert store.env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    client = store.client

    # resume: the run stopped after epoch 1 of 2 (its config asks for 2)
    config_path = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    config = yaml.safe_load(config_path.read_text())
    client.log_text(run_id, yaml.safe_dump(dict(config, epochs=2), sort_keys=False), "config.yaml")
    client.set_terminated(run_id, "KILLED")
    resumed = store.cli("train", "--resume_run_id", run_id, check=True)
    assert "resuming after epoch 1" in resumed.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    assert store.steps(run_id, "test_acc") == [1, 2]

    # register the resumed run's best.pt (pt2) and predict with it in a fresh process
    from pipeline import config as config_mod

    # the run's own data (its digest): a model whose weights descend from other data is never champion
    cfg = config_mod.load("retrain", {"dataset": "synthetic", "data_dir": str(store.data_dir),
                                      "synthetic_train": "600", "synthetic_test": "300",
                                      "limit_train": TINY["limit_train"], "limit_test": TINY["limit_test"],
                                      "registered_model": MODEL_NAME})
    dataset = data.load(cfg)
    best = runner.RunResult(run_id, "resumed", "resnet", client.get_run(run_id).data.metrics["best_test_acc"],
                            1, None)
    registry.register(run_id, cfg, best, dataset, [])
    test_mat = next(store.data_dir.glob("*/test_32x32.mat"))
    every_test_image = data.read_mat(test_mat, "test", verify=False)[0].permute(0, 2, 3, 1).numpy()
    expected = predict.probabilities(registry.classifier_from_run(run_id, "resnet"), every_test_image)
    output = tmp_path / "p.csv"
    store.cli("predict", "--model_uri", f"models:/{MODEL_NAME}@champion", "--input", str(test_mat),
              "--output", str(output), check=True)
    rows = list(csv.DictReader(open(output)))
    assert [int(r["label"]) for r in rows] == expected.argmax(1).tolist()

    with model_server(store, f"models:/{MODEL_NAME}@champion") as invoke:
        answer = np.array(invoke(dataset.test_images[:4].permute(0, 2, 3, 1).numpy()))
    assert np.allclose(answer, expected[:4], atol=1e-4)


# -- bad input at the edges -----------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels: PIL decides on the header alone."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def test_predict_skips_bombs_and_symlinks_out_of_the_folder(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    limit = Image.MAX_IMAGE_PIXELS
    png_header_only(folder / "bomb.png", 30000, 30000)            # over twice the limit: PIL raises
    png_header_only(folder / "huge.png", 10000, limit // 10000 + 1)  # over the limit: PIL only warns
    good = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(good).save(folder / "good.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(good).save(outside)
    (folder / "link.png").symlink_to(outside)
    (folder / "inside.png").symlink_to(folder / "good.png")     # stays in the folder: followed

    inputs = predict.collect(str(folder))
    lines = capsys.readouterr().out.strip().splitlines()
    assert inputs.names == ["good.png", "inside.png"]
    assert np.array_equal(inputs.images[0], np.asarray(Image.fromarray(good).resize((32, 32), Image.BILINEAR)))
    assert len(lines) == 3 and len(inputs.failures) == 3
    by_file = {name: [line for line in lines if f"{name} " in line or f"{name}:" in line]
               for name in ("bomb.png", "huge.png", "link.png")}
    assert all(len(found) == 1 for found in by_file.values()), lines
    assert "900000000 pixels, over PIL's limit" in by_file["bomb.png"][0]
    assert "decompression bomb" in by_file["huge.png"][0]
    assert "outside the input folder, not followed" in by_file["link.png"][0]


@pytest.mark.parametrize("problem,expected", [
    ("float_X", "X is float64, not uint8"),
    ("small_X", "X has shape 28x28x3x10, not 32x32x3xN"),
    ("short_y", "y holds 9 labels for 10 images in X"),
    ("bad_labels", "y holds labels outside 1-10")])
def test_a_mat_of_the_wrong_shape_or_dtype_is_one_line(tmp_path, problem, expected):
    X, y = synthetic.generate("test", 10)
    if problem == "float_X":
        X = X.astype(np.float64)
    elif problem == "small_X":
        X = X[2:30, 2:30]
    elif problem == "short_y":
        y = y[:9]
    else:
        y = y + 20
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"X": X, "y": y})
    with pytest.raises(DataError) as err:
        data.read_mat(path, "test", verify=False)
    assert str(path) in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PredictError, match=expected):  # the same line for predict's input
        predict.collect(str(path))
