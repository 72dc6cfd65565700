"""One Config for every stage: params/defaults.yaml <- params/<stage>.yaml <- overrides.

Every value arrives here as a string (from `-P key=value`) or a YAML scalar, is parsed once
into its field's type, and is validated before any data is read or any model is built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
PARAMS_DIR = PROJECT_DIR / "params"

ARCHS = ("resnet", "vgg", "resnet2")
REAL_MODEL = "svhn-classifier"
SYNTHETIC_MODEL = "svhn-classifier-synthetic"
STAGES = ("train", "model_selection", "baseline", "tune_lr", "tune_gamma", "overfit", "autotune",
          "retrain", "deepen", "main", "predict", "evaluate")


class ConfigError(ValueError):
    """A bad parameter value: the message is the one line the user sees."""


@dataclass
class Config:
    stage: str = "train"
    # model and optimiser (the seed's full_procedure defaults)
    arch: str = ""                  # "" = the parent run's arch (its winner for model_selection), else resnet
    epochs: int = 3
    bs: int = 256
    lr: float = 1e-3
    alpha: float = 0.99
    gamma: float = 0.0
    wd: float = 0.0
    tol: float = 1e-5
    patience: int = 5
    seed: int = 1412
    repeats: int = 1
    augment: bool = True
    init: str = "parent"            # parent: parent_run_id's best.pt; scratch: fresh; auto: parent if given
    # a named set of sizes over every stage (params/scale_<name>.yaml); full = the seed's own
    scale: str = "full"
    # caps that `main` passes to every stage so the whole study can run at toy size (0 = no cap)
    max_epochs: int = 0
    max_repeats: int = 0
    # sweeps (empty = the single value above)
    lrs: list = field(default_factory=list)
    gammas: list = field(default_factory=list)
    wds: list = field(default_factory=list)
    bss: list = field(default_factory=list)
    archs: list = field(default_factory=list)
    # multi-phase stages: baseline's short probe run (test0), retrain/deepen's first phase
    probe_epochs: int = 0
    probe_tol: float = 1e-5
    phase1_epochs: int = 0
    phase1_lr: float = 1e-3
    phase1_bs: int = 256
    phase1_gamma: float = 0.0
    phase1_wd: float = 0.0
    phase1_tol: float = 1e-10
    # hardware
    device: str = "auto"
    data_pipeline: str = "tensor"   # tensor: batched uint8 augmentation; torchvision: the seed's DataLoader
    compile: str = "false"          # false | true (torch.compile's default mode) | one of COMPILE_MODES
    precision: str = "auto"         # auto: bf16 autocast where the hardware does bf16 natively
    eval_bs: int = 0                # evaluation batch size; 0 = automatic (eval_batch_size)
    num_workers: int = 0
    log_every: int = 50             # progress line every N batches
    # data
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
    # lineage and reliability
    parent_run_id: str = ""
    resume_run_id: str = ""
    force: bool = False             # take over a run whose writer looks alive
    checkpoint_every: int = 1       # write last.pt (for resuming) every N epochs
    # where children train: local = one after another in this process; ray = Ray tasks
    executor: str = "local"
    ray_address: str = ""           # "" = start a local Ray; "auto" or "ray://host:port" joins a cluster
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0     # fractions (0.25) pack several children onto one GPU
    max_retries: int = 3            # Ray retries a child whose worker died this many times
    # autotune: an Optuna study (TPE, seeded) over lr_range, gamma_range, wd_range and bss
    tuner: str = "seed"             # main: seed = tune_lr -> tune_gamma -> overfit; optuna = one autotune stage
    n_trials: int = 20              # trials in the study, counted over every run of the same command
    trial_epochs: int = 10          # epochs of a trial that is not pruned
    pruner: str = "median"          # median | hyperband | none (Optuna's pruners)
    startup_trials: int = 5         # the first trials are sampled at random and never pruned
    prune_warmup_epochs: int = 2    # median: no pruning before this epoch; hyperband: its min_resource
    trial_batch: int = 0            # trials asked at once; 0 = 1 locally, as many as run at once on Ray
    optuna_storage: str = ""        # "" = <tracking db>.optuna.db beside a SQLite store, else ./optuna.db
    lr_range: list = field(default_factory=list)     # [low, high], log-uniform
    gamma_range: list = field(default_factory=list)  # [low, high], uniform
    wd_range: list = field(default_factory=list)     # [low, high], log-uniform ...
    wd_zero_below: float = 0.0      # ... and a draw below this trains with wd = 0 (weight decay off)
    # registry and prediction
    registered_model: str = ""     # "" = svhn-classifier, or svhn-classifier-synthetic for synthetic data
    register: bool = False
    promote: bool = False           # move `champion` to this run's version whatever the comparison says
    model_uri: str = ""             # "" = models:/<model_name>@champion
    input: str = ""
    output: str = "predictions.csv"
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

    def eval_batch_size(self, device_type: str) -> int:
        """eval_bs, or when it is 0: bs on a CPU (1024 measured no faster there, at 4x the memory),
        max(bs, 1024) on CUDA (a quarter of the kernel launches and host round trips)."""
        if self.eval_bs:
            return self.eval_bs
        return max(self.bs, AUTO_EVAL_BS_CUDA) if device_type == "cuda" else self.bs

    def resolved_data_dir(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser().resolve()
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

    def training_key(self, data_digest: str) -> str:
        """Hash of everything that decides a result: params, code version, the data's digest, and
        the device type and precision it resolves to here (a bf16 run never stands in for fp32)."""
        from .train import resolve_runtime  # torch is only needed once a key is asked for

        params = self.to_params()
        # where the data lies and how it was fetched do not matter: its digest does
        for volatile in ("log_every", "resume_run_id", "env_manager", "num_workers", "force", "promote",
                         "data_dir", "download", "checkpoint_every", *EXECUTION, *TUNING_EXECUTION,
                         *SPEED):
            params.pop(volatile, None)
        device, precision = resolve_runtime(self.device, self.precision)
        params.update(data_digest=data_digest, device_type=device.type, resolved_precision=precision)
        text = yaml.safe_dump(params, sort_keys=True) + code_version()
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def study_key(self, data_digest: str) -> str:
        """The training key less how far a study goes (n_trials): what a child trains and which
        study (or stage) it belongs to. A FINISHED stage is reused by its training_key, which
        keeps n_trials: a study asked for 3 trials is not the one that ran 2."""
        return self.replace(n_trials=1).training_key(data_digest)


FIELD_TYPES = {f.name: f for f in fields(Config)}
# where and how children run: never part of what they compute, so never of a training key
EXECUTION = ("executor", "ray_address", "cpus_per_trial", "gpus_per_trial", "max_retries")
# where an Optuna study is kept and how many trials are asked at once: not what a trial computes
TUNING_EXECUTION = ("optuna_storage", "trial_batch")
# how fast the same arithmetic runs: compiled kernels and the evaluation batch size change results
# only by float rounding (as cuDNN's algorithm choice does), so a run at other values stands in
SPEED = ("compile", "eval_bs")
# torch.compile's modes besides its default (compile=true); the CUDA graph ones matter on a GPU
COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AUTO_EVAL_BS_CUDA = 1024
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


# (name, check, allowed range as the user should read it)
RULES = [
    ("arch", lambda v: v in ARCHS or v == "", "one of " + "|".join(ARCHS) + " (or empty: the parent's)"),
    ("archs", lambda v: all(a in ARCHS for a in v), "a list of " + "|".join(ARCHS)),
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("bs", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: v > 0, "> 0"),
    ("alpha", lambda v: 0 <= v < 1, "0 <= alpha < 1"),
    ("gamma", lambda v: 0 <= v < 1, "0 <= gamma < 1"),
    ("wd", lambda v: v >= 0, ">= 0"),
    ("tol", lambda v: v >= 0, ">= 0"),
    ("patience", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("repeats", lambda v: v >= 1, ">= 1"),
    ("init", lambda v: v in ("parent", "scratch", "auto"), "parent|scratch|auto"),
    ("max_epochs", lambda v: v >= 0, ">= 0 (0 = no cap)"),
    ("max_repeats", lambda v: v >= 0, ">= 0 (0 = no cap)"),
    ("lrs", lambda v: all(x > 0 for x in v), "numbers > 0"),
    ("gammas", lambda v: all(0 <= x < 1 for x in v), "numbers in [0, 1)"),
    ("wds", lambda v: all(x >= 0 for x in v), "numbers >= 0"),
    ("bss", lambda v: all(x >= 1 for x in v), "integers >= 1"),
    ("probe_epochs", lambda v: v >= 0, ">= 0 (0 = no probe run)"),
    ("probe_tol", lambda v: v >= 0, ">= 0"),
    ("phase1_epochs", lambda v: v >= 0, ">= 0 (0 = no first phase)"),
    ("phase1_lr", lambda v: v > 0, "> 0"),
    ("phase1_bs", lambda v: v >= 1, ">= 1"),
    ("phase1_gamma", lambda v: 0 <= v < 1, "0 <= phase1_gamma < 1"),
    ("phase1_wd", lambda v: v >= 0, ">= 0"),
    ("phase1_tol", lambda v: v >= 0, ">= 0"),
    ("device", lambda v: v in ("auto", "cpu", "cuda"), "auto|cpu|cuda"),
    ("precision", lambda v: v in ("auto", "fp32", "bf16"), "auto|fp32|bf16"),
    ("compile", lambda v: v in ("false", "true", *COMPILE_MODES),
     "false|true|" + "|".join(COMPILE_MODES) + " (true: torch.compile's default mode)"),
    ("eval_bs", lambda v: v >= 0, ">= 0 (0 = automatic: bs on a CPU, max(bs, 1024) on CUDA)"),
    ("data_pipeline", lambda v: v in ("tensor", "torchvision"), "tensor|torchvision"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
    ("checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("executor", lambda v: v in ("local", "ray"), "local|ray"),
    ("tuner", lambda v: v in ("seed", "optuna"), "seed|optuna"),
    ("n_trials", lambda v: v >= 1, ">= 1"),
    ("trial_epochs", lambda v: v >= 1, ">= 1"),
    ("pruner", lambda v: v in ("median", "hyperband", "none"), "median|hyperband|none"),
    ("startup_trials", lambda v: v >= 0, ">= 0"),
    ("prune_warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("trial_batch", lambda v: v >= 0, ">= 0 (0 = as many as run at once)"),
    ("lr_range", lambda v: not v or (len(v) == 2 and 0 < v[0] <= v[1]), "two numbers 0 < low <= high"),
    ("gamma_range", lambda v: not v or (len(v) == 2 and 0 <= v[0] <= v[1] < 1),
     "two numbers 0 <= low <= high < 1"),
    ("wd_range", lambda v: not v or (len(v) == 2 and 0 < v[0] <= v[1]),
     "two numbers 0 < low <= high (wd_zero_below turns the low end into wd=0)"),
    ("wd_zero_below", lambda v: v >= 0, ">= 0 (0 = wd is never 0)"),
    ("cpus_per_trial", lambda v: v > 0, "> 0"),
    ("gpus_per_trial", lambda v: v >= 0, ">= 0 (fractions such as 0.25 share a GPU)"),
    ("max_retries", lambda v: v >= 0, ">= 0"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("dataset", lambda v: v in ("svhn", "synthetic"), "svhn|synthetic"),
    ("limit_train", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("limit_test", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("val_split", lambda v: 0 <= v <= 0.5, "0 <= val_split <= 0.5 (0 = select on test, as the seed)"),
    ("data_seed", lambda v: v >= 0, ">= 0"),
    ("synthetic_train", lambda v: v >= 1, ">= 1"),
    ("synthetic_test", lambda v: v >= 1, ">= 1"),
    ("env_manager", lambda v: v in ("local", "conda", "virtualenv", "uv"), "local|conda|virtualenv|uv"),
]


def validate(cfg: Config) -> Config:
    if cfg.stage not in STAGES:
        raise ConfigError(f"unknown stage '{cfg.stage}': use one of {', '.join(STAGES)}")
    for name, check, allowed in RULES:
        value = getattr(cfg, name)
        if not check(value):
            raise ConfigError(f"parameter {name}={format_value(value)} is out of range: "
                              f"allowed {allowed}; fix it with -P {name}=<value>")
    return cfg


def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"missing {path}: every stage needs its parameter file; restore it "
                          f"from git (`git checkout -- params/{path.name}`)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of parameter: value")
    return data


def load(stage: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """defaults.yaml <- <stage>.yaml <- overrides, each value parsed and the result validated."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}': use one of {', '.join(STAGES)}")
    merged: dict[str, Any] = {}
    merged.update(read_yaml(PARAMS_DIR / "defaults.yaml"))
    merged.update(read_yaml(PARAMS_DIR / f"{stage}.yaml"))
    merged.update(scale_values(stage, (overrides or {}).get("scale", merged.get("scale", "full"))))
    merged.update(overrides or {})
    merged["stage"] = stage
    values = {name: parse_value(name, raw) for name, raw in merged.items()}
    check_sweep_overrides(values, overrides or {})
    return apply_caps(validate(Config(**values)))


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


# a scalar that a non-empty sweep list replaces: giving it alone would be silently ignored
SWEEP_OF = {"lr": "lrs", "gamma": "gammas", "wd": "wds", "bs": "bss", "arch": "archs"}


def check_sweep_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    for scalar, sweep in SWEEP_OF.items():
        if scalar in overrides and values.get(sweep):
            points = ",".join(format_value(v) for v in values[sweep])
            raise ConfigError(
                f"-P {scalar}={overrides[scalar]} would be ignored: stage {values['stage']} sweeps "
                f"{sweep}={points}; pass -P {sweep}={overrides[scalar]} for a one-point sweep")


def check_lineage(cfg: Config) -> None:
    """A stage that starts from a parent's checkpoint needs a parent: never fall back to scratch."""
    if cfg.init == "parent" and not cfg.parent_run_id:
        raise ConfigError(f"stage {cfg.stage} starts from a parent run's checkpoint (init=parent) but "
                          f"no parent_run_id was given: pass -P parent_run_id=<run id>, or "
                          f"-P init=scratch to train from fresh weights")


def from_params(params: Mapping[str, str]) -> Config:
    """Rebuild a Config from what a run logged (its config.yaml or params)."""
    values = {k: parse_value(k, v) for k, v in params.items() if k in FIELD_TYPES}
    return validate(Config(**values))


def code_version() -> str:
    """Hash of the code and default params: a changed file invalidates reused runs."""
    digest = hashlib.sha256()
    files = sorted((PROJECT_DIR / "pipeline").glob("*.py")) + sorted(PARAMS_DIR.glob("*.yaml"))
    files.append(PROJECT_DIR / "MLproject")
    for path in files:
        if path.exists():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
