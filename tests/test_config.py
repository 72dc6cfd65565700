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


def test_caps_apply_to_every_phase():
    cfg = config.load("retrain", {"max_epochs": "1", "max_repeats": "1"})
    assert cfg.capped_epochs(cfg.phase1_epochs) == 1 and cfg.capped_epochs(cfg.epochs) == 1
    assert cfg.capped_repeats(5) == 1
    assert config.load("retrain").capped_epochs(15) == 15


def test_training_key_follows_params_not_spelling():
    a = config.load("train", {"lr": "1e-4"}).training_key()
    assert a == config.load("train", {"lr": "0.0001"}).training_key()
    assert a != config.load("train", {"lr": "0.0002"}).training_key()
    assert a == config.load("train", {"lr": "1e-4", "log_every": "7"}).training_key()


def test_round_trip_through_logged_params():
    cfg = config.load("overfit", {"wds": "5e-5,1e-4", "bss": "64,128"})
    assert config.from_params(cfg.to_params()) == cfg
