"""A champion it has to earn, after a real `mlflow run -e retrain`: a smoke run from other data
never takes the alias, whatever it logged; a champion that fails to load keeps it.
(tests/test_registry.py covers the comparison itself: better, tie, worse, other splits.)"""
import shutil

import pytest

from support.digits import constant_model_run
from support.store import TINY
from pipeline import config, data, lifecycle, registry, runner

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def champion_store(module_store):
    module_store.mlflow_run("retrain", module_store.params({"max_epochs": "1"}))
    return module_store


MODEL = "svhn-classifier-synthetic"


def smoke_cfg(store, same_data: bool = False):
    """A registering config on 8 test images, or (same_data) on the champion's own data."""
    limits = {k: TINY[k] for k in ("limit_train", "limit_test")} if same_data else {"limit_test": "8"}
    return config.load("retrain", {"dataset": "synthetic", "data_dir": str(store.data_dir),
                                   "synthetic_train": "600", "synthetic_test": "300", **limits})


def wrong_model_run(store, dataset) -> str:
    """A run whose best.pt answers one digit absent from the 8 held-out images: 0% on them."""
    absent = next(d for d in range(10) if d not in set(dataset.test_labels.tolist()))
    return constant_model_run(store, absent, dataset.digest)


def test_a_smoke_run_reading_100_percent_does_not_take_the_alias(champion_store, monkeypatch, capsys):
    store = champion_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    before = store.client.get_model_version_by_alias(MODEL, "champion")
    cfg = smoke_cfg(store)
    dataset = data.load(cfg)
    smoke = wrong_model_run(store, dataset)
    figure = runner.RunResult(smoke, "smoke", "resnet", 100.0, 1, None, "test", 100.0)  # what it logged
    version = registry.register(smoke, cfg, figure, dataset, [])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert store.client.get_model_version_by_alias(MODEL, "champion").version == before.version
    assert f"registered {MODEL} version {version} 0.000%; alias 'champion' stays on version {before.version}" in line
    assert "trained on other data" in line
    tags = store.client.get_model_version(MODEL, version).tags
    assert tags["judged_on"] == "test" and tags["judged_on_digest"] == dataset.test.digest
    assert float(tags["judged_acc"]) == 0.0 and tags["data_digest"] == dataset.digest


def test_a_champion_that_cannot_be_loaded_keeps_the_alias(champion_store, monkeypatch, capsys):
    store = champion_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    before = store.client.get_model_version_by_alias(MODEL, "champion")
    cfg = smoke_cfg(store, same_data=True)
    dataset = data.load(cfg)
    assert dataset.digest == before.tags["data_digest"]  # comparable: only the failed load keeps the alias
    # the champion's files are gone from the store: reading it fails, whatever the challenger scores
    location = store.client.get_logged_model(before.source.rstrip("/").split("/")[-1]).artifact_location
    shutil.rmtree(location.removeprefix("file://"))
    challenger = runner.RunResult(before.run_id, "same", "resnet", 100.0, 1, None, "test", 100.0)
    version = registry.register(before.run_id, cfg, challenger, dataset, [])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert store.client.get_model_version_by_alias(MODEL, "champion").version == before.version
    assert f"alias 'champion' stays on version {before.version}: champion version {before.version} could not be loaded" in line
    assert version != before.version


def test_a_retrain_whose_weights_diverged_registers_a_version_that_never_takes_the_alias(store, monkeypatch):
    """Phase 2 at lr 1e10 turns every weight to NaN in one step: the stage still finishes, skips
    its report, and its version stays off the alias (argmax of NaN reads digit 0: a figure that
    could win). (A phase 1 that diverged stops the stage before phase 2: test_runner.)"""
    proc = store.cli("retrain", *[f"--{k}={v}" for k, v in store.params(
        {"epochs": "1", "phase1_epochs": "1", "lr": "1e10", "init": "scratch"}).items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no evaluation report: the model's outputs are not finite (NaN or inf) for 64 of 64 images" in proc.stdout
    (version,) = store.client.search_model_versions(f"name = '{MODEL}'")
    assert version.aliases == [] and version.tags["judged_acc"] == "nan"
    assert "its weights diverged), so it is never champion" in proc.stdout
    (phase2,) = store.client.search_runs(["0"], "tags.phase = '2'")
    assert phase2.data.tags["diverged"] == "true"  # it stopped after epoch 1 of 1, which is its best
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert lifecycle.history_from_record(phase2.info.run_id).best_diverged()  # as reuse reads it back
