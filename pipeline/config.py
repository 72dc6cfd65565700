"""One Config for every stage: params/defaults.yaml <- params/<stage>.yaml <- overrides.

Every value arrives here as a string (from `-P key=value`) or a YAML scalar, is parsed once
into its field's type, and is validated before any data is read or any model is built.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .rules import RULES
from .urls import holds_password

PROJECT_DIR = Path(__file__).resolve().parent.parent
PARAMS_DIR = PROJECT_DIR / "params"

REAL_MODEL = "svhn-classifier"
SYNTHETIC_MODEL = "svhn-classifier-synthetic"
STAGES = ("train", "model_selection", "baseline", "tune_lr", "tune_gamma", "overfit", "autotune",
          "retrain", "deepen", "main", "predict", "evaluate")


def absolute(path: str) -> Path:
    """A path as this process's working directory reads it (a stage may run in another)."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError:  # ~name of no user here, or ~ with no home known
        raise ConfigError(f"path {path}: {path.split('/')[0]} names no home directory on this machine: "
                          f"give the path in full") from None
    try:
        return expanded.resolve()
    except RuntimeError:  # Python 3.11's resolve() on a symlink loop
        raise ConfigError(f"path {path}: a symbolic link in it points back at itself (a loop): "
                          f"fix the link or give another path") from None


@dataclass
class Config:
    stage: str = "train"
    # -- training: the model and its optimiser (the seed's full_procedure defaults)
    arch: str = ""                  # "" = the parent run's arch (its winner for model_selection), else resnet
    epochs: int = 3
    bs: int = 256
    lr: float = 1e-3
    alpha: float = 0.99
    gamma: float = 0.0
    wd: float = 0.0
    lr_schedule: str = "constant"   # constant (the seed's) | cosine: lr falls each epoch towards 0
    tol: float = 1e-5
    patience: int = 5
    seed: int = 1412
    repeats: int = 1
    augment: bool = True
    # -- lineage: where a run starts from, and how it is continued
    init: str = "parent"            # parent: parent_run_id's best.pt; scratch: fresh; auto: parent if given
    parent_run_id: str = ""
    resume_run_id: str = ""
    force: bool = False             # take over a run whose writer looks alive
    checkpoint_every: int = 1       # write last.pt (for resuming) every N epochs
    # -- scale: how big the study is
    # a named set of sizes over every stage (params/scale_<name>.yaml); full = the seed's own
    scale: str = "full"
    # caps that `main` passes to every stage so the whole study can run at toy size (0 = no cap)
    max_epochs: int = 0
    max_repeats: int = 0
    # -- sweeps: sweeps (empty = the single value above)
    lrs: list = field(default_factory=list)
    gammas: list = field(default_factory=list)
    wds: list = field(default_factory=list)
    bss: list = field(default_factory=list)
    archs: list = field(default_factory=list)
    # -- phases: multi-phase stages: baseline's short probe run (test0), retrain/deepen's first phase
    probe_epochs: int = 0
    probe_tol: float = 1e-5
    phase1_epochs: int = 0
    phase1_lr: float = 1e-3
    phase1_bs: int = 256
    phase1_gamma: float = 0.0
    phase1_wd: float = 0.0
    phase1_tol: float = 1e-10
    # -- hardware: how the arithmetic runs
    device: str = "auto"
    data_pipeline: str = "tensor"   # tensor: batched uint8 augmentation; torchvision: the seed's DataLoader
    compile: str = "false"          # false | true (torch.compile's default mode) | one of COMPILE_MODES
    precision: str = "auto"         # auto: bf16 autocast where the hardware does bf16 natively
    eval_bs: int = 0                # evaluation batch size; 0 = automatic (eval_batch_size)
    num_workers: int = 0
    log_every: int = 50             # progress line every N batches
    # -- data: the data
    dataset: str = "svhn"
    data_dir: str = ""              # "" = data/svhn or data/synthetic under the project
    verify: bool = True
    download: bool = False
    limit_train: int = 0
    limit_test: int = 0
    val_split: float = 0.0          # fraction of train held out (stratified) for every selection; 0 = seed's protocol
    data_seed: int = 1412           # fixes the synthetic set and the validation split, apart from `seed`
    synthetic_train: int = 8000
    synthetic_test: int = 2000
    # -- execution: where children train: local = one after another in this process; ray = Ray tasks
    executor: str = "local"
    ray_address: str = ""           # "" = start a local Ray; "auto" or "ray://host:port" joins a cluster
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0     # fractions (0.25) pack several children onto one GPU
    max_retries: int = 3            # Ray retries a child whose worker died this many times
    # -- study: autotune: an Optuna study (TPE, seeded), how far it goes and where it is kept
    n_trials: int = 20              # trials in the study, counted over every run of the same command
    epoch_budget: int = 0           # 0 = none; else no new trial once epochs trained + a whole trial pass it
    trial_epochs: int = 10          # epochs of a trial that is not pruned
    pruner: str = "hyperband"       # hyperband | median | none (Optuna's pruners)
    startup_trials: int = 5         # the first trials are sampled at random (median: never pruned)
    prune_warmup_epochs: int = 2    # median: no pruning before this epoch; hyperband: its min_resource
    trial_batch: int = 0            # trials in flight at once; 0 = 1 locally, as many as run at once on Ray
    optuna_storage: str = ""        # "" = <tracking db>.optuna.db beside a SQLite store, else ./optuna.db
    trials_from: str = "parent"     # parent: each trial from the stage's start; best: from the best complete trial so far
    # -- search: autotune's search space: lr_range, gamma_range, wd_range and bss
    lr_range: list = field(default_factory=list)     # [low, high], log-uniform
    gamma_range: list = field(default_factory=list)  # [low, high], uniform
    wd_range: list = field(default_factory=list)     # [low, high], log-uniform ...
    wd_zero_below: float = 0.0      # ... and a draw below this trains with wd = 0 (weight decay off)
    start_from_seed: bool = True    # a new study's trial 0 is the seed chain's own point (overfit's)
    # -- registry: the registered model
    registered_model: str = ""     # "" = svhn-classifier, or svhn-classifier-synthetic for synthetic data
    register: bool = False
    promote: bool = False           # move `champion` to this run's version whatever the comparison says
    model_uri: str = ""             # "" = models:/<model_name>@champion
    # -- prediction: predict's input and output
    input: str = ""
    output: str = "predictions.csv"
    # -- main: what only `main` reads: which chain, and how it starts each stage
    tuner: str = "seed"             # main: seed = tune_lr -> tune_gamma -> overfit; optuna = one autotune stage
    env_manager: str = "local"
    # -- derived values -------------------------------------------------------------------
    def capped_epochs(self, epochs: int) -> int:
        return min(epochs, self.max_epochs) if self.max_epochs else epochs

    def capped_repeats(self, repeats: int) -> int:
        return min(repeats, self.max_repeats) if self.max_repeats else repeats

    @property
    def selects_on(self) -> str:
        """The split every choice is made on: validation when held out, else test (the seed's)."""
        return "val" if self.val_split > 0 else "test"

    @property
    def compile_mode(self) -> str:
        """The torch.compile mode the `compile` param names; "" = not compiled."""
        return {"false": "", "true": "default"}.get(self.compile, self.compile)

    def resolved_data_dir(self) -> Path:
        if self.data_dir:
            return absolute(self.data_dir)
        return PROJECT_DIR / "data" / self.dataset

    @property
    def model_name(self) -> str:
        """The registered model: synthetic data registers under a name of its own, so a toy
        model never competes with (or replaces) a model of the real digits."""
        if self.registered_model:
            return self.registered_model
        return SYNTHETIC_MODEL if self.dataset == "synthetic" else REAL_MODEL

    @property
    def champion_uri(self) -> str:
        return self.model_uri or f"models:/{self.model_name}@champion"

    def replace(self, **changes: Any) -> "Config":
        return validate(dataclasses.replace(self, **changes))

    def to_params(self) -> dict[str, str]:
        """Canonical string form, so one value always logs with one spelling."""
        return {f.name: format_value(getattr(self, f.name)) for f in fields(self)}

    def section(self, name: str) -> dict[str, Any]:
        """One section's values (SECTIONS), e.g. cfg.section("optimiser")."""
        return {field_name: getattr(self, field_name) for field_name in SECTIONS[name]}


FIELD_TYPES = {f.name: f for f in fields(Config)}
# Config's fields in sections, in declaration order (as airbench's hyp['opt'|'aug'|'net']). The
# fields stay flat attributes, so every `-P name=value` and every logged param keeps its name; what
# reads a whole section (main's hand-on, the key's volatile params) reads it from here.
SECTIONS = {
    "run": ("stage",),
    "training": ("arch", "epochs", "bs", "lr", "alpha", "gamma", "wd", "lr_schedule", "tol", "patience", "seed",
                 "repeats", "augment"),
    "lineage": ("init", "parent_run_id", "resume_run_id", "force", "checkpoint_every"),
    "scale": ("scale", "max_epochs", "max_repeats"),
    "sweeps": ("lrs", "gammas", "wds", "bss", "archs"),
    "phases": ("probe_epochs", "probe_tol", "phase1_epochs", "phase1_lr", "phase1_bs", "phase1_gamma",
               "phase1_wd", "phase1_tol"),
    "hardware": ("device", "data_pipeline", "compile", "precision", "eval_bs", "num_workers", "log_every"),
    "data": ("dataset", "data_dir", "verify", "download", "limit_train", "limit_test", "val_split",
             "data_seed", "synthetic_train", "synthetic_test"),
    "execution": ("executor", "ray_address", "cpus_per_trial", "gpus_per_trial", "max_retries"),
    "study": ("n_trials", "epoch_budget", "trial_epochs", "pruner", "startup_trials", "prune_warmup_epochs",
              "trial_batch", "optuna_storage", "trials_from"),
    "search": ("lr_range", "gamma_range", "wd_range", "wd_zero_below", "start_from_seed"),
    "registry": ("registered_model", "register", "promote", "model_uri"),
    "prediction": ("input", "output"),
    "main": ("tuner", "env_manager"),
}
LIST_ITEM_TYPES = {"lrs": float, "gammas": float, "wds": float, "bss": int, "archs": str,
                   "lr_range": float, "gamma_range": float, "wd_range": float}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ",".join(format_value(v) for v in value)
    return str(value)


def _field_kind(name: str) -> type:
    default = Config.__dataclass_fields__[name]
    if default.default_factory is not dataclasses.MISSING:
        return list
    return type(default.default)


def parse_value(name: str, raw: Any) -> Any:
    """Parse one raw value (string from the CLI or YAML scalar) into the field's type."""
    if name not in FIELD_TYPES:
        known = ", ".join(sorted(FIELD_TYPES))
        raise ConfigError(f"unknown parameter '{name}': known parameters are {known}")
    kind = _field_kind(name)
    if name == "compile":  # a bool in every spelling, or a mode's name
        try:
            return "true" if _parse_scalar(bool, raw) else "false"
        except ValueError:
            return str(raw).strip().lower()
    try:
        if kind is list:
            items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s.strip()]
            item_type = LIST_ITEM_TYPES[name]
            return [_parse_scalar(item_type, item) for item in items]
        return _parse_scalar(kind, raw)
    except (TypeError, ValueError):
        expected = {int: "an integer", float: "a number", bool: "true or false",
                    list: f"a comma-separated list of {LIST_ITEM_TYPES.get(name, str).__name__}s"}
        raise ConfigError(
            f"parameter {name}={raw!r} is not {expected.get(kind, 'a string')}; "
            f"fix it with -P {name}=<value>") from None


def _parse_scalar(kind: type, raw: Any) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is int:
        number = float(str(raw).strip())
        if not number.is_integer():
            raise ValueError(raw)
        return int(number)
    if kind is float:
        number = float(str(raw).strip())
        if not math.isfinite(number):
            raise ValueError(raw)
        return number
    return "" if raw is None else str(raw).strip()


def validate(cfg: Config) -> Config:
    if cfg.stage not in STAGES:
        raise ConfigError(f"unknown stage '{cfg.stage}': use one of {', '.join(STAGES)}")
    for name, check, allowed in RULES:
        value = getattr(cfg, name)
        if not check(value):
            raise ConfigError(f"parameter {name}={format_value(value)} is out of range: "
                              f"allowed {allowed}; fix it with -P {name}=<value>")
    if holds_password(cfg.optuna_storage):  # said without the value, which would show it
        raise ConfigError("parameter optuna_storage holds a password, which every run would log (its params and "
                          "config.yaml): drop it from the URL and give it as the database driver reads it "
                          "(PostgreSQL: PGPASSWORD or ~/.pgpass); `mlflow run` logs every -P on the run it makes "
                          "before this check, so delete that run: `mlflow runs delete --run-id ID`, then "
                          "`mlflow gc --backend-store-uri STORE --run-ids ID`")
    return cfg


def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"missing {path}: every stage needs its parameter file; restore it "
                          f"from git (`git checkout -- params/{path.name}`)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path} is not valid YAML{at} ({getattr(err, 'problem', None) or type(err).__name__}): "
                          f"fix it, or restore it from git (`git checkout -- params/{path.name}`)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of parameter: value")
    return data


def load(stage: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """defaults.yaml <- <stage>.yaml <- overrides, each value parsed and the result validated."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}': use one of {', '.join(STAGES)}")
    if "stage" in (overrides or {}):  # it would be overwritten below, silently
        given = overrides["stage"]
        instead = f"run `mlflow run . -e {given}`" if given in STAGES else f"use one of {', '.join(STAGES)}"
        raise ConfigError(f"-P stage={given} is not a parameter: the entry point names the stage; {instead} instead")
    merged: dict[str, Any] = {}
    merged.update(read_yaml(PARAMS_DIR / "defaults.yaml"))
    merged.update(read_yaml(PARAMS_DIR / f"{stage}.yaml"))
    merged.update(scale_values(stage, (overrides or {}).get("scale", merged.get("scale", "full"))))
    merged.update(overrides or {})
    merged["stage"] = stage
    values = {name: parse_value(name, raw) for name, raw in merged.items()}
    check_sweep_overrides(values, overrides or {})
    check_registry_overrides(values, overrides or {})
    check_stage_reads(values["stage"], overrides or {})
    check_model_overrides(values["stage"], overrides or {})
    check_dataset_overrides(values, overrides or {})
    check_capped_overrides(values, overrides or {})
    check_search_overrides(values, overrides or {})
    check_execution_overrides(values, overrides or {})
    return check_repeat_seeds(check_autotune(apply_caps(validate(Config(**values)))))


def scale_names() -> list[str]:
    return ["full"] + sorted(p.stem.removeprefix("scale_") for p in PARAMS_DIR.glob("scale_*.yaml"))


def scale_values(stage: str, scale: Any) -> dict[str, Any]:
    """A named scale's values for `stage`: its `all:` section, then its section for the stage.
    They sit between params/<stage>.yaml and -P, so every value they set is logged as a param."""
    name = str(scale).strip()
    if name == "full":  # the seed's own sizes: params/<stage>.yaml as they are
        return {}
    path = PARAMS_DIR / f"scale_{name}.yaml"
    if not name.replace("_", "").replace("-", "").isalnum() or not path.exists():
        raise ConfigError(f"parameter scale={name} is unknown: allowed {'|'.join(scale_names())} "
                          f"(each but full is a params/scale_<name>.yaml); fix it with -P scale=<name>")
    sections = read_yaml(path)
    unknown = set(sections) - {"all", *STAGES}
    if unknown:
        raise ConfigError(f"{path} has sections {', '.join(sorted(unknown))}: use 'all' or a stage name")
    values: dict[str, Any] = {}
    for section in ("all", stage):
        part = sections.get(section) or {}
        if not isinstance(part, dict):
            raise ConfigError(f"{path}: section '{section}' must hold a mapping of parameter: value")
        values.update(part)
    return values


CAPPED = {"max_epochs": ("epochs", "probe_epochs", "phase1_epochs", "trial_epochs"), "max_repeats": ("repeats",)}


def check_capped_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """-P epochs=30 with -P max_epochs=2: the run would train 2, while `mlflow run` has logged the
    epochs param as given (30), and a param cannot change: refused, so the record says what ran."""
    for cap, names in CAPPED.items():
        for name in names:
            if name in overrides and cap in overrides and 0 < values[cap] < values[name]:
                raise ConfigError(f"-P {name}={overrides[name]} with -P {cap}={overrides[cap]}: the run would "
                                  f"run with {name}={values[cap]} while its {name} param reads {overrides[name]}; "
                                  f"pass -P {name}={values[cap]}, or drop {cap}")


def apply_caps(cfg: Config) -> Config:
    """Bake `main`'s caps into the values themselves, so every run logs the epochs it trains."""
    if cfg.max_epochs:
        cfg.epochs = min(cfg.epochs, cfg.max_epochs)
        cfg.probe_epochs = min(cfg.probe_epochs, cfg.max_epochs)
        cfg.phase1_epochs = min(cfg.phase1_epochs, cfg.max_epochs)
        cfg.trial_epochs = min(cfg.trial_epochs, cfg.max_epochs)
    if cfg.max_repeats:
        cfg.repeats = min(cfg.repeats, cfg.max_repeats)
    return cfg


def check_autotune(cfg: Config) -> Config:
    """autotune's search space, and its budget against its trials (main's are checked as autotune
    will load them)."""
    if cfg.stage != "autotune":
        return cfg
    missing = [name for name in ("lr_range", "gamma_range", "wd_range", "bss") if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"autotune needs a search space: {', '.join(missing)} empty; set them in "
                          f"params/autotune.yaml or with -P (e.g. -P lr_range=1e-5,2e-3 -P bss=64,128)")
    if 0 < cfg.epoch_budget < cfg.trial_epochs:  # after the caps
        raise ConfigError(f"epoch_budget={cfg.epoch_budget} is below trial_epochs={cfg.trial_epochs}: no trial "
                          f"could start; raise it to at least {cfg.trial_epochs}, or 0 for no budget")
    return cfg


def check_repeat_seeds(cfg: Config) -> Config:
    """Repeat r trains with seed + r: the last repeat's seed must be one numpy takes too."""
    last = cfg.seed + cfg.repeats - 1
    if last >= 2 ** 31:
        raise ConfigError(f"seed={cfg.seed} with repeats={cfg.repeats} seeds its last repeat with {last}: allowed "
                          f"seed + repeats - 1 < 2147483648; lower it with -P seed=<value>")
    return cfg


# a scalar that a non-empty sweep list replaces: giving it alone would be silently ignored
SWEEP_OF = {"lr": "lrs", "gamma": "gammas", "wd": "wds", "bs": "bss", "arch": "archs"}


# what autotune draws or trains each trial with instead of the scalar (bs: its bss, above)
SEARCHED_BY = {"lr": "lr_range", "gamma": "gamma_range", "wd": "wd_range", "epochs": "trial_epochs"}


def check_search_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    if values["stage"] != "autotune":
        return
    for scalar, instead in SEARCHED_BY.items():
        if scalar in overrides:
            raise ConfigError(f"-P {scalar}={overrides[scalar]} would be ignored: autotune trains each trial with "
                              f"{instead}={format_value(values.get(instead))}; pass -P {instead}=... instead")


# Where a stage's children train: read by the stages that have children, and only on Ray
RAY_ONLY = ("ray_address", "cpus_per_trial", "gpus_per_trial")


def check_execution_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """`train` is one run in its own process: it places no children, on Ray or anywhere. The Ray
    keys, and a trial_batch other than 0 (one at a time here), place children on Ray only."""
    if values["stage"] == "train":
        given = [n for n in ("executor", *RAY_ONLY, "max_retries")
                 if n in overrides and not (n == "executor" and values[n] == "local")]
        if given:
            raise ConfigError(f"-P {given[0]}={overrides[given[0]]} would be ignored: train trains one run in its "
                              f"own process (the executor places a stage's children); drop it")
    elif values.get("executor") != "ray":
        given = [n for n in (*RAY_ONLY, "trial_batch") if n in overrides and not (n == "trial_batch" and
                                                                                   values[n] == 0)]
        if given:
            raise ConfigError(f"-P {given[0]}={overrides[given[0]]} would be ignored: it places children on Ray, "
                              f"and executor={values.get('executor')}; add -P executor=ray, or drop it")


def check_sweep_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    for scalar, sweep in SWEEP_OF.items():
        if scalar in overrides and values.get(sweep):
            points = ",".join(format_value(v) for v in values[sweep])
            raise ConfigError(
                f"-P {scalar}={overrides[scalar]} would be ignored: stage {values['stage']} sweeps "
                f"{sweep}={points}; pass -P {sweep}={overrides[scalar]} for a one-point sweep")


def registers(stage: str) -> bool:
    """Whether the stage's result goes to the model registry: its params file says register: true."""
    return bool(read_yaml(PARAMS_DIR / f"{stage}.yaml").get("register", False))


def check_registry_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """-P register / promote / registered_model where nothing would register (predict and evaluate
    read registered_model's champion; main hands it to the stages that register): refused, never
    silently ignored (registered_model is part of the training key: it would also stop reuse)."""
    names = ("register", "promote") if values["stage"] in ("predict", "evaluate", "main") else \
        ("register", "promote", "registered_model")
    for name in names:
        if name in overrides and not registers(values["stage"]):
            registering = " and ".join(stage for stage in STAGES if registers(stage))
            raise ConfigError(f"-P {name}={overrides[name]} would be ignored: stage {values['stage']} registers "
                              f"no model ({registering} do); drop it")
    if "promote" in overrides and values.get("promote") and not values.get("register"):
        raise ConfigError(f"-P promote={overrides['promote']} would be ignored: stage {values['stage']} runs with "
                          f"register=false; add -P register=true, or drop promote")


# Data parameters only one dataset reads: synthetic data is made here, SVHN's files are found,
# downloaded and checked
READ_ONLY_FOR = {"synthetic_train": "synthetic", "synthetic_test": "synthetic", "download": "svhn", "verify": "svhn"}


def check_dataset_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """-P synthetic_train with dataset=svhn, or -P download / verify with dataset=synthetic: refused,
    never silently ignored (the run would log a value that shaped nothing). A dataset out of range
    is validate()'s to report; a resume's dataset is the run's own (session.resume checks it)."""
    if values.get("dataset") not in READ_ONLY_FOR.values() or values.get("resume_run_id"):
        return
    for name, reader in READ_ONLY_FOR.items():
        if name in overrides and values["dataset"] != reader:
            raise ConfigError(f"-P {name}={overrides[name]} would be ignored: only dataset={reader} reads it, and "
                              f"this run reads dataset={values['dataset']}; drop it, or add -P dataset={reader}")


# Parameters only some stages read (main has its own rule: workflow.stage_overrides): given to
# any other stage, they would be ignored
READ_ONLY_BY = {
    "archs": ("model_selection",), "repeats": ("model_selection", "baseline"), "lrs": ("tune_lr",),
    "gammas": ("tune_gamma",), "wds": ("overfit",), "bss": ("overfit", "autotune"),
    **{name: ("baseline",) for name in ("probe_epochs", "probe_tol")},
    **{name: ("retrain", "deepen") for name in SECTIONS["phases"] if name.startswith("phase1_")},
    **{name: ("autotune",) for name in (*SECTIONS["study"], *SECTIONS["search"])},
    "tuner": ("main",),
}


def refuse_unread(stage: str, overrides: Mapping[str, Any], readers_of: Mapping[str, tuple[str, ...]],
                  also: str = "") -> None:
    """One line for the first -P that `readers_of` says only other stages read."""
    for name, readers in readers_of.items():
        if name in overrides and stage not in readers:
            raise ConfigError(f"-P {name}={overrides[name]} would be ignored: only {' and '.join(readers)} "
                              f"read{'s' if len(readers) == 1 else ''} it, not {stage}{also}; drop it")


# stages whose every child trains from scratch: a parent's weights would be recorded, never loaded
FROM_SCRATCH = ("model_selection",)


def check_stage_reads(stage: str, overrides: Mapping[str, Any]) -> None:
    """-P of a parameter the stage never reads (lrs to retrain, repeats to train, n_trials to
    tune_lr, a parent to model_selection): refused, never silently ignored."""
    if stage != "main":
        refuse_unread(stage, overrides, READ_ONLY_BY)
    if stage in FROM_SCRATCH:
        for name in ("parent_run_id", "init"):
            if name in overrides and not (name == "init" and str(overrides[name]).strip() == "scratch"):
                raise ConfigError(f"-P {name}={overrides[name]} would be ignored: {stage} trains every arch "
                                  f"from scratch, so it starts from no parent's weights; drop it")


# What the stages that use a registered model read: predict labels `input` into `output` with the
# model (model_uri, or the champion of registered_model / dataset's name); evaluate judges it on
# the test split of its data parameters. Anything else given to them would be ignored.
MODEL_ONLY = {"input": ("predict",), "output": ("predict",), "model_uri": ("predict", "evaluate")}
PREDICT_READS = frozenset({"input", "output", "model_uri", "registered_model", "dataset", "env_manager"})
# evaluate: the model, and the data whose test split it judges (scale sets the data's sizes)
EVALUATE_READS = frozenset({"model_uri", "registered_model", *SECTIONS["data"], "scale", "env_manager"})
WHAT_IT_READS = {
    "predict": (PREDICT_READS, "input, output and the model (model_uri, or the champion that registered_model "
                               "or dataset names)"),
    "evaluate": (EVALUATE_READS, "the model (model_uri, or the champion that registered_model or dataset names) "
                                 "and the data whose test split it judges (-P dataset, data_dir, scale, limit_test, "
                                 "...)"),
}


def check_model_overrides(stage: str, overrides: Mapping[str, Any]) -> None:
    """-P input / output / model_uri where the stage reads none, or a training -P (epochs, lr) given
    to predict or evaluate, or a data -P to predict: refused, never silently ignored."""
    also = "; evaluate judges the model on the test split of its data (-P data_dir, dataset)" \
        if stage == "evaluate" else ""
    refuse_unread(stage, overrides, MODEL_ONLY, also)
    reads, described = WHAT_IT_READS.get(stage, (None, ""))
    unread = sorted(overrides.keys() - reads) if reads is not None else []
    if unread:
        raise ConfigError(f"{', '.join(f'-P {name}' for name in unread)} would be ignored: {stage} reads only "
                          f"{described}; drop {'it' if len(unread) == 1 else 'them'}")
    # model_uri names the model: a registered model's name (or, to predict, the dataset's) would not
    naming = ("registered_model", "dataset") if stage == "predict" else ("registered_model",)
    if str(overrides.get("model_uri", "")).strip():
        for name in (n for n in naming if n in overrides):
            raise ConfigError(f"-P {name}={overrides[name]} would be ignored: -P model_uri names the model "
                              f"{stage} uses; drop {name}, or drop model_uri to use the champion it names")


def from_params(params: Mapping[str, str]) -> Config:
    """Rebuild a Config from what a run logged (its config.yaml or params)."""
    values = {k: parse_value(k, v) for k, v in params.items() if k in FIELD_TYPES}
    return validate(Config(**values))
