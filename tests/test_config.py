"""Config: precedence, number spellings, validation messages, canonical params."""
import pytest

from pipeline import config
from pipeline.config import ConfigError


def test_precedence_defaults_then_stage_then_overrides():
    cfg = config.load("tune_gamma")
    assert cfg.lr == 1e-4 and cfg.gammas == [1e-4] and cfg.epochs == 30  # stage yaml
    assert cfg.alpha == 0.99 and cfg.seed == 1412  # defaults.yaml
    assert config.load("tune_gamma", {"lr": "2e-4"}).lr == 2e-4  # -P wins


@pytest.mark.parametrize("spelling", ["1e-4", "0.0001", "1E-04", ".0001"])
def test_any_number_spelling_gives_one_canonical_param(spelling):
    cfg = config.load("train", {"lr": spelling})
    assert cfg.lr == 0.0001
    assert cfg.to_params()["lr"] == "0.0001"


def test_lists_bools_and_ints_parse():
    cfg = config.load("tune_lr", {"lrs": "0.0005, 1e-4", "augment": "False", "epochs": "2.0"})
    assert cfg.lrs == [0.0005, 0.0001]
    assert cfg.augment is False and cfg.epochs == 2
    assert cfg.to_params()["lrs"] == "0.0005,0.0001"


def test_seed_defaults_per_stage():
    assert config.load("tune_lr").lrs == [0.00075, 0.0005, 0.00025, 0.0002, 0.0001]
    retrain = config.load("retrain")
    assert (retrain.phase1_lr, retrain.phase1_epochs, retrain.lr, retrain.gamma, retrain.bs, retrain.wd) \
        == (1e-3, 15, 1e-5, 1e-4, 128, 5e-5)
    deepen = config.load("deepen")
    assert deepen.arch == "resnet2" and deepen.augment is False and deepen.lr == 1e-4
    selection = config.load("model_selection")
    assert selection.archs == ["resnet", "vgg"] and selection.repeats == 5 and selection.epochs == 3


@pytest.mark.parametrize("key,value,fragment", [
    ("lr", "-1", "lr=-1.0"),
    ("arch", "alexnet", "arch=alexnet"),
    ("lrs", "abc", "lrs='abc'"),
    ("epochs", "0", "epochs=0"),
    ("gamma", "1", "gamma=1.0"),
    ("bs", "0", "bs=0"),
    ("limit_train", "-5", "limit_train=-5"),
    ("epochs", "two", "epochs='two'"),
    ("device", "tpu", "device=tpu"),
])
def test_bad_values_get_one_line_naming_the_parameter(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        config.load("train", {key: value})
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert f"-P {key}=" in message  # says how to fix it


def test_unknown_parameter_is_rejected():
    with pytest.raises(ConfigError, match="unknown parameter 'learning_rate'"):
        config.load("train", {"learning_rate": "0.1"})


def test_caps_are_baked_into_the_values_every_run_logs():
    cfg = config.load("retrain", {"max_epochs": "1", "max_repeats": "1"})
    assert (cfg.phase1_epochs, cfg.epochs) == (1, 1)  # what a run logs is what it trains
    cfg = config.load("baseline", {"max_epochs": "2", "max_repeats": "1"})
    assert (cfg.probe_epochs, cfg.epochs, cfg.repeats) == (2, 2, 1)
    assert (config.load("retrain").phase1_epochs, config.load("retrain").epochs) == (15, 30)


def key(stage="train", digest="d" * 64, **overrides):
    return config.load(stage, overrides).training_key(digest)


def test_training_key_follows_params_not_spelling():
    a = key(lr="1e-4")
    assert a == key(lr="0.0001")
    assert a != key(lr="0.0002")
    assert a == key(lr="1e-4", log_every="7")


def test_training_key_changes_with_data_parent_and_precision():
    a = key("tune_lr", parent_run_id="a" * 32)
    assert a != key("tune_lr", parent_run_id="b" * 32)  # a new upstream run: nothing downstream is stale
    assert a != key("tune_lr", digest="e" * 64, parent_run_id="a" * 32)  # other data bytes
    assert a != key("tune_lr", parent_run_id="a" * 32, val_split="0.1")
    assert key(precision="fp32") != key(precision="bf16")  # a bf16 run never stands in for fp32


def test_a_scalar_that_a_sweep_overrides_is_refused():
    with pytest.raises(ConfigError, match=r"-P lr=0.1 would be ignored: stage tune_lr sweeps lrs=.*-P lrs=0.1"):
        config.load("tune_lr", {"lr": "0.1"})
    with pytest.raises(ConfigError, match="sweeps bss=128"):
        config.load("overfit", {"bs": "64"})
    assert config.load("tune_lr", {"lrs": "0.1"}).lrs == [0.1]  # the one-point sweep it suggests
    assert config.load("tune_lr", {"lr": "0.1", "lrs": ""}).lr == 0.1  # no sweep: the scalar is used


def test_init_parent_without_a_parent_is_refused():
    with pytest.raises(ConfigError, match="init=parent.*no parent_run_id.*-P init=scratch"):
        config.check_lineage(config.load("tune_lr"))
    config.check_lineage(config.load("tune_lr", {"init": "scratch"}))
    config.check_lineage(config.load("train"))  # init=auto: scratch without a parent


def test_a_missing_stage_parameter_file_is_refused(tmp_path, monkeypatch):
    for name in ("defaults.yaml", "train.yaml"):
        (tmp_path / name).write_text((config.PARAMS_DIR / name).read_text())
    monkeypatch.setattr(config, "PARAMS_DIR", tmp_path)
    assert config.load("train").arch == "resnet"
    (tmp_path / "train.yaml").unlink()
    with pytest.raises(ConfigError, match=r"missing .*train.yaml: .*git checkout"):
        config.load("train")


def test_round_trip_through_logged_params():
    cfg = config.load("overfit", {"wds": "5e-5,1e-4", "bss": "64,128"})
    assert config.from_params(cfg.to_params()) == cfg


def test_demo_scale_sits_between_the_stage_yaml_and_p():
    demo = {stage: config.load(stage, {"scale": "demo"}) for stage in ("baseline", "overfit", "retrain")}
    assert (demo["baseline"].limit_train, demo["baseline"].bs, demo["baseline"].epochs) == (3000, 32, 4)
    assert demo["baseline"].probe_epochs == 1 and demo["baseline"].tol == 1e-10  # the rest: baseline.yaml
    assert demo["overfit"].bss == [16] and demo["overfit"].wds == [5e-5]
    assert (demo["retrain"].phase1_epochs, demo["retrain"].phase1_bs, demo["retrain"].bs) == (6, 32, 16)
    assert demo["retrain"].to_params()["scale"] == "demo"  # logged with every run
    assert config.load("retrain", {"scale": "demo", "bs": "8"}).bs == 8  # -P wins
    capped = config.load("retrain", {"scale": "demo", "max_epochs": "2"})
    assert (capped.phase1_epochs, capped.epochs) == (2, 1)  # main's caps still apply
    full = config.load("retrain")
    assert (full.scale, full.limit_train, full.bs, full.phase1_epochs) == ("full", 0, 128, 15)


def test_unknown_scale_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"scale=huge is unknown: allowed full\|demo") as err:
        config.load("train", {"scale": "huge"})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="scale=../defaults is unknown"):
        config.load("train", {"scale": "../defaults"})
