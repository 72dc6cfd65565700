"""A champion it has to earn: the alias moves only when the challenger beats the champion on this
run's held-out data, both evaluated in the registering run; a failed read never moves it."""
import shutil

import pytest
import torch

from pipeline import config, data, models, registry, runner, tracking

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def champion_store(module_store):
    module_store.mlflow_run("retrain", module_store.params({"max_epochs": "1"}))
    return module_store


def smoke_cfg(store):
    return config.load("retrain", {"dataset": "synthetic", "data_dir": str(store.data_dir),
                                   "synthetic_train": "600", "synthetic_test": "300", "limit_test": "8"})


def wrong_model_run(store, dataset) -> str:
    """A run whose best.pt answers one digit absent from the 8 held-out images: 0% on them."""
    absent = next(d for d in range(10) if d not in set(dataset.test_labels.tolist()))
    net = models.build("resnet")
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.fill_(-10.0)
        net.fc.bias[absent] = 10.0
    experiment = store.client.get_experiment_by_name("Default").experiment_id
    run_id = store.client.create_run(experiment, tags={"stage": "smoke"}).info.run_id
    tracking.save_checkpoint(run_id, tracking.BEST, net.state_dict())
    return run_id


def test_a_smoke_run_reading_100_percent_does_not_take_the_alias(champion_store, monkeypatch, capsys):
    store = champion_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    before = store.client.get_model_version_by_alias("svhn-classifier", "champion")
    cfg = smoke_cfg(store)
    dataset = data.load(cfg)
    smoke = wrong_model_run(store, dataset)
    figure = runner.RunResult(smoke, "smoke", "resnet", 100.0, 1, None, "test", 100.0)  # what it logged
    version = registry.register(smoke, cfg, figure, dataset)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    champion_acc = registry.accuracy(registry.classifier_from_run(before.run_id, "resnet"), dataset.test)
    assert store.client.get_model_version_by_alias("svhn-classifier", "champion").version == before.version
    assert f"version {version} 0.000% vs champion version {before.version} {champion_acc:.3f}%" in line
    assert f"test split (8 images, digest {dataset.test.digest[:12]})" in line and "stays" in line
    tags = store.client.get_model_version("svhn-classifier", version).tags
    assert tags["judged_on"] == "test" and tags["judged_on_digest"] == dataset.test.digest
    assert float(tags["judged_acc"]) == 0.0 and tags["data_digest"] == dataset.digest


def test_a_champion_that_cannot_be_loaded_keeps_the_alias(champion_store, monkeypatch, capsys):
    store = champion_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    before = store.client.get_model_version_by_alias("svhn-classifier", "champion")
    cfg = smoke_cfg(store)
    dataset = data.load(cfg)
    # the champion's files are gone from the store: reading it fails, whatever the challenger scores
    location = store.client.get_logged_model(before.source.rstrip("/").split("/")[-1]).artifact_location
    shutil.rmtree(location.removeprefix("file://"))
    challenger = runner.RunResult(before.run_id, "same", "resnet", 100.0, 1, None, "test", 100.0)
    version = registry.register(before.run_id, cfg, challenger, dataset)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert store.client.get_model_version_by_alias("svhn-classifier", "champion").version == before.version
    assert f"alias 'champion' not moved: champion version {before.version} could not be loaded" in line
    assert version != before.version
