"""Config: precedence, number spellings, validation messages, canonical params."""
import dataclasses

import pytest

from pipeline import config, lineage
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


def test_a_scalar_that_a_sweep_overrides_is_refused():
    with pytest.raises(ConfigError, match=r"-P lr=0.1 would be ignored: stage tune_lr sweeps lrs=.*-P lrs=0.1"):
        config.load("tune_lr", {"lr": "0.1"})
    with pytest.raises(ConfigError, match="sweeps bss=128"):
        config.load("overfit", {"bs": "64"})
    assert config.load("tune_lr", {"lrs": "0.1"}).lrs == [0.1]  # the one-point sweep it suggests
    assert config.load("tune_lr", {"lr": "0.1", "lrs": ""}).lr == 0.1  # no sweep: the scalar is used


def test_init_parent_without_a_parent_is_refused():
    with pytest.raises(ConfigError, match="init=parent.*no parent_run_id.*-P init=scratch"):
        lineage.check_lineage(config.load("tune_lr"))
    lineage.check_lineage(config.load("tune_lr", {"init": "scratch"}))
    lineage.check_lineage(config.load("train"))  # init=auto: scratch without a parent


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


# (param, smallest or largest accepted value, first rejected value)
BOUNDS = [
    ("epochs", "1", "0"), ("bs", "1", "0"), ("lr", "1e-12", "0"), ("alpha", "0", "-0.01"),
    ("alpha", "0.999", "1"), ("gamma", "0", "-0.01"), ("gamma", "0.999", "1"), ("wd", "0", "-1e-9"),
    ("tol", "0", "-1e-9"), ("patience", "1", "0"), ("seed", "0", "-1"), ("seed", "2147483647", "2147483648"),
    ("data_seed", "0", "-1"), ("data_seed", "4294967295", "4294967296"), ("repeats", "1", "0"),
    ("max_epochs", "0", "-1"), ("max_repeats", "0", "-1"), ("lrs", "1e-12", "0"),
    ("gammas", "0", "-0.01"), ("gammas", "0.999", "1"), ("wds", "0", "-1e-9"), ("bss", "1", "0"),
    ("probe_epochs", "0", "-1"), ("probe_tol", "0", "-1e-9"), ("phase1_epochs", "0", "-1"),
    ("phase1_lr", "1e-12", "0"), ("phase1_bs", "1", "0"), ("phase1_gamma", "0", "-0.01"),
    ("phase1_gamma", "0.999", "1"), ("phase1_wd", "0", "-1e-9"), ("phase1_tol", "0", "-1e-9"),
    ("num_workers", "0", "-1"), ("log_every", "1", "0"), ("limit_train", "0", "-1"),
    ("limit_test", "0", "-1"), ("synthetic_train", "1", "0"), ("synthetic_test", "1", "0"),
    ("arch", "", "resnet3"), ("arch", "resnet2", "vgg16"), ("archs", "resnet,vgg,resnet2", "resnet,alex"),
    # a sweep names each point once (two of one value would be one child, trained once)
    ("archs", "resnet,vgg", "vgg,resnet,vgg"), ("lrs", "0.001,0.0001", "0.001,1e-3"), ("gammas", "0,0.9", "0.9,0.9"),
    ("wds", "0,5e-5", "0,0"), ("bss", "32,64", "64,64"),
    ("init", "scratch", "random"), ("device", "cuda", "gpu"), ("precision", "bf16", "fp16"),
    ("data_pipeline", "torchvision", "dali"), ("dataset", "synthetic", "mnist"),
    ("env_manager", "uv", "docker"), ("eval_bs", "0", "-1"),
    ("compile", "max-autotune-no-cudagraphs", "fast"),
    # what MLflow's registry refuses only once a stage has trained, and an alias separator
    ("registered_model", "svhn classifier-2.1", "team/svhn"), ("registered_model", "svhn-x", "svhn:2"),
    ("registered_model", "x..y", "svhn@v2"), ("registered_model", "x.", ".."), ("registered_model", "x", "..x"),
    ("registered_model", "m" * 256, "m" * 257),  # MLflow's column: String(256)
    ("registered_model", "svhn;v2", "svhn?v2"), ("registered_model", "svhn%v2", "svhn#v2"),  # URI delimiters
]


@pytest.mark.parametrize("name,accepted,rejected", BOUNDS)
def test_each_rule_accepts_its_boundary_and_rejects_past_it(name, accepted, rejected):
    stage = "retrain" if name == "registered_model" else config.READ_ONLY_BY.get(name, ("train",))[0]  # reads it
    dataset = {"dataset": config.READ_ONLY_FOR[name]} if name in config.READ_ONLY_FOR else {}  # reads it too
    assert config.load(stage, {name: accepted, **dataset}).to_params()[name] == \
        config.format_value(config.parse_value(name, accepted))
    with pytest.raises(ConfigError, match=f"parameter {name}=.* is out of range: allowed "):
        config.load(stage, {name: rejected, **dataset})


@pytest.mark.parametrize("stage,given,line", [
    ("train", {"synthetic_train": "600"}, "-P synthetic_train=600 would be ignored: only dataset=synthetic reads it, "
                                          "and this run reads dataset=svhn; drop it, or add -P dataset=synthetic"),
    ("main", {"dataset": "svhn", "synthetic_test": "30"}, "-P synthetic_test=30 would be ignored: only "
                                                          "dataset=synthetic reads it"),
    ("evaluate", {"dataset": "synthetic", "verify": "false"}, "-P verify=false would be ignored: only dataset=svhn "
                                                              "reads it, and this run reads dataset=synthetic"),
    ("tune_lr", {"dataset": "synthetic", "download": "true"}, "-P download=true would be ignored: only dataset=svhn")])
def test_a_data_parameter_its_dataset_never_reads_is_refused(stage, given, line):
    with pytest.raises(ConfigError) as err:
        config.load(stage, given)
    assert str(err.value).startswith(line)
    reader = config.READ_ONLY_FOR[next(k for k in given if k != "dataset")]
    assert config.load(stage, {**given, "dataset": reader}).dataset == reader  # its own dataset takes it


def test_a_mistyped_dataset_is_said_to_be_out_of_range_not_that_a_data_parameter_is_ignored():
    with pytest.raises(ConfigError, match=r"^parameter dataset=SVHN is out of range: allowed svhn\|synthetic"):
        config.load("train", {"dataset": "SVHN", "verify": "false"})


@pytest.mark.parametrize("stage,name,value,readers", [
    ("train", "lrs", "0.1,0.01", "only tune_lr reads it"), ("retrain", "lrs", "1e-4", "only tune_lr reads it"),
    ("retrain", "repeats", "3", "only model_selection and baseline read it"),
    ("tune_lr", "gammas", "0.1", "only tune_gamma reads it"), ("overfit", "lrs", "0.1", "only tune_lr reads it"),
    ("tune_lr", "n_trials", "5", "only autotune reads it"), ("train", "phase1_lr", "0.1", "only retrain and deepen"),
    ("deepen", "probe_epochs", "2", "only baseline reads it"), ("autotune", "tuner", "optuna", "only main reads it"),
    ("evaluate", "bss", "32", "only overfit and autotune read it")])
def test_a_parameter_the_stage_never_reads_is_refused_not_ignored(stage, name, value, readers):
    with pytest.raises(ConfigError) as err:
        config.load(stage, {name: value})
    assert str(err.value) == (f"-P {name}={value} would be ignored: {readers}"
                              f"{'' if readers.endswith(' it') else ' read it'}, not {stage}; drop it")
    config.load(config.READ_ONLY_BY[name][0], {name: value})  # where it is read, taken


def test_a_value_given_with_a_cap_that_cuts_it_is_refused_so_the_param_says_what_ran():
    assert config.load("baseline", {"epochs": "2", "max_epochs": "2"}).epochs == 2
    assert config.load("baseline", {"max_epochs": "2"}).epochs == 2  # the yaml's 30, capped: logged as 2
    assert config.load("baseline", {"epochs": "30", "max_epochs": "0"}).epochs == 30  # 0: no cap
    for stage, given, line in (
            ("baseline", {"epochs": "30", "max_epochs": "2"},
             "-P epochs=30 with -P max_epochs=2: the run would run with epochs=2 while its epochs param reads 30; "
             "pass -P epochs=2, or drop max_epochs"),
            ("retrain", {"phase1_epochs": "6", "max_epochs": "1"},
             "-P phase1_epochs=6 with -P max_epochs=1: the run would run with phase1_epochs=1 while its "
             "phase1_epochs param reads 6; pass -P phase1_epochs=1, or drop max_epochs"),
            ("model_selection", {"repeats": "5", "max_repeats": "1"},
             "-P repeats=5 with -P max_repeats=1: the run would run with repeats=1 while its repeats param reads 5; "
             "pass -P repeats=1, or drop max_repeats")):
        with pytest.raises(ConfigError) as err:
            config.load(stage, given)
        assert str(err.value) == line


def test_model_selection_takes_no_parent_it_would_record_and_never_load():
    assert config.load("model_selection", {"init": "scratch"}).init == "scratch"
    for name, value in (("parent_run_id", "abc123"), ("init", "parent"), ("init", "auto")):
        with pytest.raises(ConfigError) as err:
            config.load("model_selection", {name: value})
        assert str(err.value) == (f"-P {name}={value} would be ignored: model_selection trains every arch from "
                                  f"scratch, so it starts from no parent's weights; drop it")
    assert config.load("train", {"parent_run_id": "abc123"}).parent_run_id == "abc123"  # where it is read


@pytest.mark.parametrize("raw,expected", [("true", True), ("Yes", True), ("on", True), ("1", True),
                                          (True, True), ("FALSE", False), ("no", False), ("off", False),
                                          ("0", False), (False, False)])
def test_bool_spellings(raw, expected):
    assert config.parse_value("augment", raw) is expected


@pytest.mark.parametrize("name,raw,message", [
    ("augment", "maybe", "augment='maybe' is not true or false"),
    ("epochs", "2.5", "epochs='2.5' is not an integer"),
    ("lr", "inf", "lr='inf' is not a number"),
    ("lr", "nan", "lr='nan' is not a number"),
    ("bss", "64,x", "bss='64,x' is not a comma-separated list of ints"),
])
def test_unparseable_values_say_what_was_expected(name, raw, message):
    with pytest.raises(ConfigError) as err:
        config.parse_value(name, raw)
    assert str(err.value) == f"parameter {message}; fix it with -P {name}=<value>"


def test_parsing_of_lists_strings_and_ints():
    assert config.parse_value("lrs", " 1e-3 ,, 2e-3 ") == [0.001, 0.002]
    assert config.parse_value("lrs", [0.5, "1e-4"]) == [0.5, 0.0001]
    assert config.parse_value("bss", "64") == [64] and config.parse_value("archs", "") == []
    assert config.parse_value("data_dir", None) == "" and config.parse_value("data_dir", " /x ") == "/x"
    assert config.parse_value("epochs", " 2e1 ") == 20 and config.parse_value("lr", 3) == 3.0


def test_canonical_spelling_of_values():
    assert [config.format_value(v) for v in (True, False, 1e-4, 2.0, 3, "x", [0.5, 1e-05], [64, 128], [])] \
        == ["true", "false", "0.0001", "2.0", "3", "x", "0.5,1e-05", "64,128", ""]


def test_unknown_stage_and_unknown_parameter_messages():
    with pytest.raises(ConfigError, match="^unknown stage 'nope': use one of train, model_selection, "):
        config.load("nope")
    with pytest.raises(ConfigError) as err:
        config.validate(config.Config(stage="nope"))
    assert str(err.value) == ("unknown stage 'nope': use one of train, model_selection, baseline, tune_lr, "
                              "tune_gamma, overfit, autotune, retrain, deepen, main, predict, evaluate")
    with pytest.raises(ConfigError) as err:
        config.parse_value("learning_rate", "1")
    assert "known parameters are alpha, arch, archs, augment, bs," in str(err.value)


def test_caps_take_the_smaller_value_and_zero_means_none():
    cfg = config.load("train", {"max_epochs": "5", "max_repeats": "2"})
    assert (cfg.capped_epochs(3), cfg.capped_epochs(8), cfg.capped_repeats(1), cfg.capped_repeats(4)) \
        == (3, 5, 1, 2)
    assert (config.load("train").capped_epochs(8), config.load("train").capped_repeats(4)) == (8, 4)


def test_replace_validates_and_from_params_ignores_unknown_keys():
    cfg = config.load("train")
    assert cfg.replace(lr=0.5).lr == 0.5 and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match="lr=-1"):
        cfg.replace(lr=-1.0)
    assert config.from_params(dict(cfg.to_params(), lr="0.5", not_a_param="x")) == cfg.replace(lr=0.5)
    with pytest.raises(ConfigError, match="epochs=0"):
        config.from_params({"stage": "train", "epochs": "0"})


def test_data_dir_defaults_under_the_project_and_expands_user(monkeypatch, tmp_path):
    cfg = config.load("train", {"dataset": "synthetic"})
    assert cfg.resolved_data_dir() == config.PROJECT_DIR / "data" / "synthetic"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.load("train", {"data_dir": "~/svhn"}).resolved_data_dir() == tmp_path / "svhn"


def test_params_yaml_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="missing .*missing.yaml"):
        config.read_yaml(tmp_path / "missing.yaml")  # never silently empty
    (tmp_path / "empty.yaml").write_text("")
    assert config.read_yaml(tmp_path / "empty.yaml") == {}
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping of parameter: value"):
        config.read_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("lr: 1e-4\nlrs: [0.1, 0.2\n")  # a bracket never closed
    with pytest.raises(ConfigError) as err:
        config.read_yaml(tmp_path / "broken.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'broken.yaml'} is not valid YAML at line 3, column 1 (")
    assert str(err.value).endswith("fix it, or restore it from git (`git checkout -- params/broken.yaml`)")


def test_load_reads_defaults_then_the_stage_file(tmp_path, monkeypatch):
    (tmp_path / "defaults.yaml").write_text("epochs: 7\nlr: 0.5\n")
    (tmp_path / "train.yaml").write_text("lr: 0.25\n")
    monkeypatch.setattr(config, "PARAMS_DIR", tmp_path)
    cfg = config.load("train", {"seed": "3"})
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.stage) == (7, 0.25, 3, "train")


@pytest.mark.parametrize("raw,canonical,mode", [
    ("false", "false", ""), (False, "false", ""), ("off", "false", ""), ("0", "false", ""),
    ("true", "true", "default"), (True, "true", "default"), ("Yes", "true", "default"),
    ("max-autotune", "max-autotune", "max-autotune"), (" Reduce-Overhead ", "reduce-overhead", "reduce-overhead"),
    ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
])
def test_compile_takes_a_bool_or_a_torch_compile_mode(raw, canonical, mode):
    cfg = config.load("train", {"compile": raw})
    assert cfg.to_params()["compile"] == canonical and cfg.compile_mode == mode
    assert config.from_params(cfg.to_params()).compile_mode == mode  # as a run logged it


def test_a_bad_compile_mode_is_one_line_listing_the_modes():
    with pytest.raises(ConfigError) as err:
        config.load("train", {"compile": "fast"})
    assert str(err.value) == ("parameter compile=fast is out of range: allowed false|true|reduce-overhead|"
                              "max-autotune|max-autotune-no-cudagraphs (true: torch.compile's default mode); "
                              "fix it with -P compile=<value>")


def test_main_hands_compile_and_eval_bs_on_to_every_stage():
    from pipeline import workflow

    assert workflow.stage_overrides({"compile": "max-autotune", "eval_bs": "2048"}) == \
        {"compile": "max-autotune", "eval_bs": "2048"}


def test_every_field_is_in_exactly_one_section_in_declaration_order():
    declared = [f.name for f in dataclasses.fields(config.Config)]
    assert [name for names in config.SECTIONS.values() for name in names] == declared
    cfg = config.load("tune_lr", {"lrs": "0.01,0.02", "executor": "ray"})
    assert cfg.section("sweeps")["lrs"] == [0.01, 0.02]
    assert cfg.section("execution") == {"executor": "ray", "ray_address": "", "cpus_per_trial": 1.0,
                                        "gpus_per_trial": 0.0, "max_retries": 3}
    # sections change no name: every param is logged flat, as -P spells it
    assert set(cfg.to_params()) == set(declared)


def test_the_last_repeats_seed_is_checked_with_the_seed_before_any_run():
    assert config.load("model_selection", {"seed": str(2 ** 31 - 5)}).repeats == 5  # seeds up to 2**31 - 1
    with pytest.raises(ConfigError) as err:
        config.load("model_selection", {"seed": str(2 ** 31 - 4)})
    assert str(err.value) == ("seed=2147483644 with repeats=5 seeds its last repeat with 2147483648: allowed "
                              "seed + repeats - 1 < 2147483648; lower it with -P seed=<value>")
    assert config.load("model_selection", {"seed": str(2 ** 31 - 4), "max_repeats": "4"}).repeats == 4  # capped


def test_register_and_promote_where_nothing_registers_are_refused_not_ignored():
    assert config.load("deepen", {"register": "false"}).register is False
    assert config.load("retrain", {"promote": "true"}).promote is True  # retrain registers
    for reader in ("retrain", "predict", "evaluate", "main"):  # names the model: its own, its champion, its stages'
        assert config.load(reader, {"registered_model": "mine"}).registered_model == "mine"
    for stage, given, line in (
            ("train", {"register": "true"}, "-P register=true would be ignored: stage train registers no model "
                                            "(retrain and deepen do); drop it"),
            ("tune_lr", {"promote": "true"}, "-P promote=true would be ignored: stage tune_lr registers no model "
                                             "(retrain and deepen do); drop it"),
            ("baseline", {"registered_model": "mine"}, "-P registered_model=mine would be ignored: stage baseline "
                                                       "registers no model (retrain and deepen do); drop it"),
            ("retrain", {"register": "false", "promote": "true"},
             "-P promote=true would be ignored: stage retrain runs with register=false; add -P register=true, "
             "or drop promote")):
        with pytest.raises(ConfigError) as err:
            config.load(stage, given)
        assert str(err.value) == line


def test_what_only_predict_or_evaluate_reads_is_refused_elsewhere_and_each_takes_only_what_it_reads():
    assert config.load("predict", {"input": "x.png", "output": "p.csv", "model_uri": "models:/m/1"}).input == "x.png"
    assert config.load("predict", {"input": "x.png", "dataset": "synthetic", "registered_model": "m"}).input == "x.png"
    assert config.load("evaluate", {"model_uri": "models:/m/1", "dataset": "synthetic"}).dataset == "synthetic"
    assert config.load("evaluate", {"model_uri": "models:/m/1", "limit_test": "5"}).limit_test == 5
    assert config.load("evaluate", {"scale": "demo", "dataset": "synthetic", "data_dir": "d", "val_split": "0.1",
                                    "registered_model": "m", "env_manager": "uv"}).limit_test == 1000
    for stage, given, line in (
            ("evaluate", {"input": "mine.mat"},
             "-P input=mine.mat would be ignored: only predict reads it, not evaluate; evaluate judges the model on "
             "the test split of its data (-P data_dir, dataset); drop it"),
            ("retrain", {"model_uri": "models:/m/1"},
             "-P model_uri=models:/m/1 would be ignored: only predict and evaluate read it, not retrain; drop it"),
            ("predict", {"input": "x.png", "limit_test": "5", "data_dir": "d"},
             "-P data_dir, -P limit_test would be ignored: predict reads only input, output and the model "
             "(model_uri, or the champion that registered_model or dataset names); drop them"),
            ("evaluate", {"model_uri": "models:/m/1", "epochs": "3", "lr": "0.1", "scale": "demo"},
             "-P epochs, -P lr would be ignored: evaluate reads only the model (model_uri, or the champion that "
             "registered_model or dataset names) and the data whose test split it judges (-P dataset, data_dir, "
             "scale, limit_test, ...); drop them"),
            ("predict", {"input": "x.png", "model_uri": "models:/m/1", "dataset": "synthetic"},
             "-P dataset=synthetic would be ignored: -P model_uri names the model predict uses; drop dataset, or "
             "drop model_uri to use the champion it names"),
            ("evaluate", {"model_uri": "models:/m/1", "registered_model": "m"},
             "-P registered_model=m would be ignored: -P model_uri names the model evaluate uses; drop "
             "registered_model, or drop model_uri to use the champion it names"),
            ("evaluate", {"log_every": "10"},
             "-P log_every would be ignored: evaluate reads only the model (model_uri, or the champion that "
             "registered_model or dataset names) and the data whose test split it judges (-P dataset, data_dir, "
             "scale, limit_test, ...); drop it")):
        with pytest.raises(ConfigError) as err:
            config.load(stage, given)
        assert str(err.value) == line


def test_what_autotune_draws_and_where_children_train_are_refused_where_nothing_reads_them():
    assert config.load("autotune", {"trial_epochs": "3", "lr_range": "1e-4,1e-3"}).trial_epochs == 3
    assert config.load("train", {"executor": "local"}).executor == "local"
    assert config.load("tune_lr", {"executor": "ray", "ray_address": "auto", "cpus_per_trial": "2"}).cpus_per_trial == 2
    assert config.load("autotune", {"trial_batch": "0"}).trial_batch == 0
    for stage, given, line in (
            ("autotune", {"lr": "1e-4"},
             "-P lr=1e-4 would be ignored: autotune trains each trial with lr_range=1e-05,0.002; pass "
             "-P lr_range=... instead"),
            ("autotune", {"epochs": "30"},
             "-P epochs=30 would be ignored: autotune trains each trial with trial_epochs=10; pass "
             "-P trial_epochs=... instead"),
            ("train", {"executor": "ray"},
             "-P executor=ray would be ignored: train trains one run in its own process (the executor places a "
             "stage's children); drop it"),
            ("train", {"ray_address": "auto"},
             "-P ray_address=auto would be ignored: train trains one run in its own process (the executor places a "
             "stage's children); drop it"),
            ("tune_lr", {"cpus_per_trial": "2"},
             "-P cpus_per_trial=2 would be ignored: it places children on Ray, and executor=local; add "
             "-P executor=ray, or drop it"),
            ("autotune", {"trial_batch": "4"},
             "-P trial_batch=4 would be ignored: it places children on Ray, and executor=local; add "
             "-P executor=ray, or drop it")):
        with pytest.raises(ConfigError) as err:
            config.load(stage, given)
        assert str(err.value) == line, (stage, given)


def test_the_stage_is_the_entry_point_never_a_parameter():
    with pytest.raises(ConfigError) as err:
        config.load("train", {"stage": "deepen"})
    assert str(err.value) == ("-P stage=deepen is not a parameter: the entry point names the stage; "
                              "run `mlflow run . -e deepen` instead")
    with pytest.raises(ConfigError, match=r"-P stage=deep is not a parameter: the entry point names the stage; "
                                          r"use one of train, model_selection, .*, evaluate instead"):
        config.load("train", {"stage": "deep"})
