"""The registry in a real local store: the champion alias moves only on a strictly better figure on
held-out data meant for both; other data, a tie, a worse model or a moved alias leave it; a
pickle-format model is refused before it is read."""
import dataclasses
import os

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from support.digits import constant_model_run
from pipeline import config, data, registry, runner

pytestmark = pytest.mark.e2e  # each registration exports a model (torch.export): seconds apiece

# The colour-coded test split's labels are 0,1,...,9,0,1,...: its first 8 images hold digits 0-7.
ABSENT = 9    # a model that always answers 9 scores 0% on them
PRESENT = 3   # ... always 3: 12.5% (1 of 8)


@pytest.fixture
def local(module_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_store.uri)
    yield module_store


def load(colour_data, name, **extra):
    """The retrain config and data of a registering run: the colour-coded digits, 8 test images."""
    cfg = config.load("retrain", {"dataset": "svhn", "verify": "false", "data_dir": str(colour_data / "right"),
                                  "limit_test": "8", "registered_model": name,
                                  **{k: str(v) for k, v in extra.items()}})
    return cfg, data.load(cfg)


def constant_result(store, digit: int, lineage: str, diverged: bool = False) -> runner.RunResult:
    """A run whose best.pt answers `digit` for every image: its accuracy is that digit's share;
    `lineage`: the data its weights descend from (a stage run's tag); `diverged`: NaN outputs."""
    run_id = constant_model_run(store, digit, lineage, stage="retrain", diverged=diverged)
    return runner.RunResult(run_id, f"always {digit}", "resnet", 0.0, 1, None, "test", 0.0)


def champion(store, name):
    return str(store.client.get_model_version_by_alias(name, registry.CHAMPION).version)


def register(store, cfg, dataset, digit, capsys, lineage=None, registered=None, diverged=False) -> tuple[str, str]:
    result = constant_result(store, digit, lineage or dataset.digest, diverged)
    version = registry.register(result.run_id, cfg, result, dataset, [] if registered is None else registered)
    return version, capsys.readouterr().out.strip().splitlines()[-1]


def test_only_a_strictly_better_challenger_moves_the_alias(local, colour_data, capsys):
    cfg, dataset = load(colour_data, "m-better")
    first, line = register(local, cfg, dataset, ABSENT, capsys)
    assert champion(local, "m-better") == first and "(the first)" in line
    better, line = register(local, cfg, dataset, PRESENT, capsys)
    assert champion(local, "m-better") == better
    assert f"version {better} 12.500% over version {first} 0.000%" in line
    tie, line = register(local, cfg, dataset, PRESENT, capsys)
    assert champion(local, "m-better") == better
    assert f"version {tie} 12.500% vs champion version {better} 12.500%" in line and "stays" in line
    worse, line = register(local, cfg, dataset, ABSENT, capsys)
    assert champion(local, "m-better") == better
    assert f"version {worse} 0.000% vs champion version {better} 12.500%" in line


def test_a_model_whose_outputs_are_nan_never_takes_the_alias(local, colour_data, capsys):
    """Diverged weights answer NaN, which argmax reads as digit 0: a figure (10%) that could win.
    Such a model never takes the alias: not over a champion, not as the first, not promoted."""
    cfg, dataset = load(colour_data, "m-nan")
    first, _ = register(local, cfg, dataset, ABSENT, capsys)  # 0%: the NaN model's 12.5% (digit 0) would beat it
    diverged, line = register(local, cfg, dataset, PRESENT, capsys, diverged=True)
    assert champion(local, "m-nan") == first
    assert (f"version {diverged} nan%; alias 'champion' stays on version {first}: its outputs on the test split are "
            f"not finite (NaN or inf: its weights diverged), so it is never champion") in line
    assert "to promote it anyway" not in line
    promoted = cfg.replace(promote=True)
    _, line = register(local, promoted, dataset, PRESENT, capsys, diverged=True)
    assert champion(local, "m-nan") == first and "never champion, not even with -P promote=true" in line
    # a champion whose outputs are not finite (put there by hand) loses the alias to a real figure
    local.client.set_registered_model_alias("m-nan", registry.CHAMPION, diverged)
    better, line = register(local, cfg, dataset, ABSENT, capsys)  # 0%: still a figure
    assert champion(local, "m-nan") == better
    assert f"version {better} 0.000% over version {diverged} (its outputs are not finite)" in line
    cfg_first, _ = load(colour_data, "m-nan-first")
    _, line = register(local, cfg_first, dataset, PRESENT, capsys, diverged=True)  # no champion yet: none made
    assert "alias 'champion' is not set: its outputs on the test split are not finite" in line
    with pytest.raises(MlflowException):
        local.client.get_model_version_by_alias("m-nan-first", registry.CHAMPION)


def test_a_figure_over_no_images_never_moves_the_alias(local, colour_data, capsys):
    """An accuracy over no images is nan: it compares with nothing, so it is not even the first."""
    cfg, dataset = load(colour_data, "m-none")
    empty = data.Split("test", dataset.test.images[:0], dataset.test.labels[:0], dataset.test.source,
                       dataset.test.file_sha256, dataset.test.indices[:0], dataset.test.file_rows)
    judged_nan, line = register(local, cfg, dataclasses.replace(dataset, test=empty), PRESENT, capsys)
    assert (f"version {judged_nan} nan%; alias 'champion' is not set: its accuracy on the test split is not a "
            f"number (0 images)") in line
    with pytest.raises(MlflowException):
        local.client.get_model_version_by_alias("m-none", registry.CHAMPION)


def test_a_model_registered_with_one_test_image_takes_any_batch(local, colour_data, capsys):
    cfg, dataset = load(colour_data, "m-one", limit_test=1)
    assert dataset.n_test == 1
    version, _ = register(local, cfg, dataset, PRESENT, capsys)
    model = registry.load_pt2(f"models:/m-one/{version}")
    images = dataset.train_images[:3].permute(0, 2, 3, 1).contiguous().numpy()
    assert registry.probabilities(model, images).shape == (3, 10)


def test_a_model_from_other_data_never_moves_the_alias(local, colour_data, capsys, monkeypatch):
    cfg, dataset = load(colour_data, "m-other")
    held, _ = register(local, cfg, dataset, PRESENT, capsys)  # 1 of 8: 12.5%
    # 11 test images (digits 0-9, then 0): always-0 scores 18.2% there, the champion's always-3 9.1%
    other_cfg, other = load(colour_data, "m-other", limit_test=11)
    assert other.digest != dataset.digest
    judged = []
    monkeypatch.setattr(registry, "judge_champion", lambda *a: judged.append(a) or (0.0, ""))
    challenger, line = register(local, other_cfg, other, 0, capsys)
    assert champion(local, "m-other") == held and not judged  # not even evaluated
    assert f"alias 'champion' stays on version {held}" in line and "trained on other data" in line
    assert "-P promote=true" in line and f"set_registered_model_alias('m-other', 'champion', '{challenger}')" in line


def test_a_champion_is_never_judged_on_the_split_it_trained_on(local, colour_data, capsys, monkeypatch):
    # the champion trained on all of train (val_split=0, judged on test); the challenger holds a
    # quarter of train out as validation, which the champion trained on
    cfg, dataset = load(colour_data, "m-split")
    held, _ = register(local, cfg, dataset, PRESENT, capsys)
    split_cfg, split = load(colour_data, "m-split", val_split=0.25)
    assert registry.held_out(split).role == "val"
    judged = []
    monkeypatch.setattr(registry, "judge_champion", lambda *a: judged.append(a) or (0.0, ""))
    register(local, split_cfg, split, PRESENT, capsys)
    assert champion(local, "m-split") == held and not judged


def test_a_challenger_grown_from_a_parent_on_other_data_is_not_judged(local, colour_data, capsys, monkeypatch):
    # its parent trained with val_split=0: on every image this run holds out as validation
    cfg, dataset = load(colour_data, "m-lineage", val_split=0.25)
    held, _ = register(local, cfg, dataset, ABSENT, capsys)
    judged = []
    monkeypatch.setattr(registry, "judge_champion", lambda *a: judged.append(a) or (0.0, ""))
    challenger, line = register(local, cfg, dataset, PRESENT, capsys, lineage="mixed")
    assert champion(local, "m-lineage") == held and not judged
    assert "grow out of a parent trained on other data" in line
    assert local.client.get_model_version("m-lineage", challenger).tags["lineage_digest"] == "mixed"


def test_a_first_model_of_mixed_lineage_does_not_become_champion(local, colour_data, capsys):
    cfg, dataset = load(colour_data, "m-first-mixed")
    version, line = register(local, cfg, dataset, PRESENT, capsys, lineage="mixed")
    assert "alias 'champion' is not set" in line and "grow out of a parent trained on other data" in line
    assert not local.client.get_registered_model("m-first-mixed").aliases
    assert f"set_registered_model_alias('m-first-mixed', 'champion', '{version}')" in line


def test_a_champion_of_mixed_lineage_is_never_judged(colour_data):
    from types import SimpleNamespace

    _, dataset = load(colour_data, "unused")
    part = registry.held_out(dataset)
    tags = {"data_digest": dataset.digest, "judged_on": part.role, "judged_on_digest": part.digest}
    clean = SimpleNamespace(version="1", tags={**tags, "lineage_digest": dataset.digest})
    assert registry.incomparable(clean, dataset, part) == ""
    mixed = SimpleNamespace(version="1", tags={**tags, "lineage_digest": "mixed"})
    assert "grew out of weights trained on other data" in registry.incomparable(mixed, dataset, part)
    older = SimpleNamespace(version="1", tags=tags)  # registered before lineage was recorded
    assert "records no data digest or lineage" in registry.incomparable(older, dataset, part)
    # the same data and lineage, judged on another split, or on a split of that name drawn otherwise
    other_role = "val" if part.role == "test" else "test"
    elsewhere = SimpleNamespace(version="1", tags={**tags, "lineage_digest": dataset.digest, "judged_on": other_role})
    assert registry.incomparable(elsewhere, dataset, part) == (
        f"champion version 1 was judged on its {other_role} split, this run on the {part.role} split")
    redrawn = SimpleNamespace(version="1", tags={**tags, "lineage_digest": dataset.digest, "judged_on_digest": "d"})
    assert registry.incomparable(redrawn, dataset, part).startswith("champion version 1 was judged on its ")


def test_a_run_without_a_lineage_tag_descends_from_its_data_only_if_it_trained_from_scratch():
    from pipeline import tracking

    assert tracking.descends_from({"lineage_digest": "mixed", "data_digest": "d1"}) == "mixed"
    assert tracking.descends_from({"init_from": "scratch", "data_digest": "d1"}) == "d1"  # an older stage run
    assert tracking.descends_from({"init_from": "p/checkpoints/best.pt", "data_digest": "d1"}) == ""
    assert tracking.descends_from({"source_run_id": "scratch", "data_digest": "d1"}) == "d1"  # an older child
    assert tracking.descends_from({"source_run_id": "p", "data_digest": "d1"}) == ""


def test_a_stage_from_a_parent_on_other_data_descends_from_mixed_data():
    from pipeline.stages import Lineage

    assert Lineage().data_of("d1") == "d1"  # from scratch
    assert Lineage("p", init_state={}, parent_data="d1").data_of("d1") == "d1"
    assert Lineage("p", init_state={}, parent_data="d0").data_of("d1") == "mixed"
    assert Lineage("p", init_state=None, parent_data="d0").data_of("d1") == "d1"  # init=scratch: weights not taken


def test_promote_moves_the_alias_over_an_incomparable_champion_and_says_who(local, colour_data, capsys):
    cfg, dataset = load(colour_data, "m-promote")
    held, _ = register(local, cfg, dataset, PRESENT, capsys)
    other_cfg, other = load(colour_data, "m-promote", limit_test=11, promote="true")
    promoted, line = register(local, other_cfg, other, ABSENT, capsys)  # worse, and on other data
    assert champion(local, "m-promote") == promoted
    assert "by -P promote=true" in line and f"over version {held}" in line
    tags = local.client.get_model_version("m-promote", promoted).tags
    assert tags["promoted_over"] == held and tags["promoted_by"].split("@")[0]


def test_an_alias_moved_while_judging_is_not_overwritten(local, colour_data, capsys, monkeypatch):
    cfg, dataset = load(colour_data, "m-race")
    first, _ = register(local, cfg, dataset, ABSENT, capsys)
    meanwhile, _ = register(local, cfg, dataset, ABSENT, capsys)  # a tie: the alias stays on `first`
    judge = registry.judge_champion

    def another_run_promotes_meanwhile(champion_version, part):
        local.client.set_registered_model_alias("m-race", registry.CHAMPION, meanwhile)
        return judge(champion_version, part)

    monkeypatch.setattr(registry, "judge_champion", another_run_promotes_meanwhile)
    better, line = register(local, cfg, dataset, PRESENT, capsys)
    assert champion(local, "m-race") == meanwhile
    assert f"the alias moved to version {meanwhile} while this run judged version {first}" in line


def test_withdraw_puts_the_alias_back_only_if_it_still_points_at_the_withdrawn_version(local, colour_data, capsys,
                                                                                     monkeypatch):
    cfg, dataset = load(colour_data, "m-withdraw")
    first, _ = register(local, cfg, dataset, ABSENT, capsys)
    other, _ = register(local, cfg, dataset, ABSENT, capsys)  # a tie: the alias stays on `first`
    mine = []  # what this stage registered (the session's list): earlier runs' versions are not in it
    register(local, cfg, dataset, PRESENT, capsys, registered=mine)
    assert len(mine) == 1
    registry.withdraw(mine)
    assert mine == []
    assert champion(local, "m-withdraw") == first

    def versions():
        return {str(v.version) for v in local.client.search_model_versions("name='m-withdraw'")}

    assert versions() == {first, other}
    registered = []
    mine, _ = register(local, cfg, dataset, PRESENT, capsys, registered=registered)
    assert champion(local, "m-withdraw") == mine
    local.client.set_registered_model_alias("m-withdraw", registry.CHAMPION, other)  # another run's move
    registry.withdraw(registered)
    assert champion(local, "m-withdraw") == other and versions() == {first, other}
    # another run moves it after withdraw read it on this run's version, before the delete
    local.client.set_registered_model_alias("m-withdraw", registry.CHAMPION, first)
    mine, _ = register(local, cfg, dataset, PRESENT, capsys, registered=registered)
    assert champion(local, "m-withdraw") == mine
    real_delete = MlflowClient.delete_model_version

    def moved_meanwhile(self, name, version):
        self.set_registered_model_alias(name, registry.CHAMPION, other)
        return real_delete(self, name, version)

    monkeypatch.setattr(MlflowClient, "delete_model_version", moved_meanwhile)
    registry.withdraw(registered)
    assert champion(local, "m-withdraw") == other and versions() == {first, other}  # not back on `first`
    monkeypatch.setattr(MlflowClient, "delete_model_version", real_delete)
    # the store fails as withdraw looks at the alias again: said, and the next version is withdrawn too
    for _ in range(2):
        register(local, cfg, dataset, PRESENT, capsys, registered=registered)
    real_lookup, lookups = MlflowClient.get_model_version_by_alias, []

    def fails_after_the_delete(self, name, alias):
        lookups.append(name)
        if len(lookups) == 3:  # 1: the tie's version, not the champion; 2: the champion's, then deleted
            raise MlflowException("the store is down")
        return real_lookup(self, name, alias)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", fails_after_the_delete)
    capsys.readouterr()
    registry.withdraw(registered)
    assert registered == [] and versions() == {first, other}
    out = capsys.readouterr().out
    assert "not put back on version" in out and "(the store is down)" in out


def test_a_version_left_by_a_run_that_died_unfinished_is_withdrawn_and_the_alias_put_back(local, colour_data,
                                                                                           capsys):
    cfg, dataset = load(colour_data, "m-left")
    first, _ = register(local, cfg, dataset, ABSENT, capsys)
    dead = constant_result(local, PRESENT, dataset.digest)
    left = registry.register(dead.run_id, cfg, dead, dataset, [])  # then SIGKILL: nothing withdrew it
    assert champion(local, "m-left") == left
    finished = constant_result(local, PRESENT, dataset.digest)
    kept = registry.register(finished.run_id, cfg, finished, dataset, [])  # a tie: the alias stays
    local.client.set_terminated(finished.run_id, "FINISHED")
    registry.withdraw_left_by(local.client.get_run(finished.run_id))  # a finished run's stays
    local.client.delete_tag(dead.run_id, "registered_model_version")  # killed before it tagged its run
    registry.withdraw_left_by(local.client.get_run(dead.run_id))
    assert f"withdrew m-left version {left}: its run did not finish; alias 'champion' back on version {first}" \
        in capsys.readouterr().out
    assert champion(local, "m-left") == first
    assert {str(v.version) for v in local.client.search_model_versions("name='m-left'")} == {first, kept}
    registry.withdraw_left_by(local.client.get_run(dead.run_id))  # withdrawn already: nothing to do
    assert capsys.readouterr().out == ""

    again = constant_result(local, ABSENT, dataset.digest)  # 0%: behind the champion
    promoted = load(colour_data, "m-left", promote="true")[0]
    left = registry.register(again.run_id, promoted, again, dataset, [])  # promoted over `first`...
    local.client.delete_model_version("m-left", first)  # ...which is then deleted by hand
    capsys.readouterr()
    registry.withdraw_left_by(local.client.get_run(again.run_id))
    assert capsys.readouterr().out.startswith(
        f"withdrew m-left version {left}: its run did not finish; alias 'champion' not put back on version {first} (")
    assert {str(v.version) for v in local.client.search_model_versions("name='m-left'")} == {kept}
    with pytest.raises(MlflowException):  # unset, not pointing at a version that is gone
        local.client.get_model_version_by_alias("m-left", registry.CHAMPION)


def test_a_registered_model_that_a_withdrawn_version_created_goes_with_it(local, colour_data, capsys):
    def exists(name):
        return bool(local.client.search_registered_models(f"name = '{name}'"))

    cfg, dataset = load(colour_data, "m-created")
    mine = []
    register(local, cfg, dataset, PRESENT, capsys, registered=mine)  # the first version: creates the model
    registry.withdraw(mine)
    assert "registered model m-created deleted" in capsys.readouterr().out and not exists("m-created")
    # another run's version registered meanwhile keeps the model, and its alias
    register(local, cfg, dataset, ABSENT, capsys, registered=mine)
    other, _ = register(local, cfg, dataset, PRESENT, capsys)
    registry.withdraw(mine)
    assert exists("m-created") and champion(local, "m-created") == other
    # a model this run did not create stays, even empty (a name someone made by hand)
    local.client.delete_model_version("m-created", other)
    register(local, cfg, dataset, PRESENT, capsys, registered=mine)
    registry.withdraw(mine)
    assert exists("m-created")
    # the version of a run that died unfinished (SIGKILL), found by its run id and tags
    dead = constant_result(local, PRESENT, dataset.digest)
    registry.register(dead.run_id, load(colour_data, "m-created-dead")[0], dead, dataset, [])
    registry.withdraw_left_by(local.client.get_run(dead.run_id))
    assert not exists("m-created-dead")


class RunsCode(nn.Module):
    """Unpickling this module runs a shell command: what a planted pickle-format model could do."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled_version(store, name, marker, tags) -> str:
    import mlflow

    experiment = store.client.get_experiment_by_name("Default").experiment_id
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(RunsCode(marker), name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])  # no inference: it would load it
    version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    store.client.set_registered_model_alias(name, registry.CHAMPION, version)
    return version


def test_a_pickle_format_champion_is_refused_unread(local, colour_data, tmp_path, capsys):
    cfg, dataset = load(colour_data, "m-pickle")
    part = registry.held_out(dataset)
    marker = tmp_path / "ran"
    planted = pickled_version(local, "m-pickle", marker, {
        "data_digest": dataset.digest, "lineage_digest": dataset.digest, "judged_on": part.role,
        "judged_on_digest": part.digest})
    challenger, line = register(local, cfg, dataset, PRESENT, capsys)
    assert champion(local, "m-pickle") == planted and not marker.exists()
    assert f"model m-pickle version {planted}" in line and "stored in pickle format, not pt2" in line
    assert "alias 'champion' stays" in line

    # predict, with MLFLOW_ALLOW_PICKLE_DESERIALIZATION unset (MLflow's default: true): one line, exit 2
    env = dict(local.env)
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
    local.env, saved = env, local.env
    try:
        proc = local.cli("predict", "--model_uri", "models:/m-pickle@champion",
                         "--input", str(colour_data / "right" / "test_32x32.mat"), "--output", str(tmp_path / "p.csv"))
    finally:
        local.env = saved
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"model m-pickle version {planted}" in lines[0] and "pickle format" in lines[0]
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
    assert not local.runs("tags.mlflow.runName = 'predict'")  # refused before a run was made


def test_the_cli_turns_pickle_deserialisation_off_unless_the_user_set_it(monkeypatch, tmp_path):
    from pipeline.__main__ import PICKLE, main

    monkeypatch.delenv(PICKLE, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--bs", "0"]) == 2  # refused (predict reads no bs), after the setting
    assert os.environ[PICKLE] == "false"
    monkeypatch.setenv(PICKLE, "true")
    main(["predict", "--bs", "0"])
    assert os.environ[PICKLE] == "true"


def test_synthetic_data_registers_under_its_own_name():
    assert config.load("retrain", {"dataset": "synthetic"}).model_name == "svhn-classifier-synthetic"
    assert config.load("retrain", {"dataset": "svhn"}).model_name == "svhn-classifier"
    assert config.load("retrain", {"dataset": "synthetic", "registered_model": "mine"}).model_name == "mine"
