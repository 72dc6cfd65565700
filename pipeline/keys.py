"""The keys that decide reuse: a run's training key, a study's key, a child's key, and the code
version they all include. Equal keys mean the same computation: same params, data, code, device
type and precision (a bf16 run never stands in for fp32)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib

import yaml

from .config import PARAMS_DIR, PROJECT_DIR, SECTIONS, Config, apply_caps
from .runtime import Runtime

# where an Optuna study is kept and how many trials are in flight at once: not what a trial computes
TUNING_EXECUTION = ("optuna_storage", "trial_batch")
# how fast the same arithmetic runs: compiled kernels and the evaluation batch size change results
# only by float rounding (as cuDNN's algorithm choice does), so a run at other values stands in
SPEED = ("compile", "eval_bs")
# what never changes a result: where data lies and how it was fetched (its digest counts), how the
# run is logged, continued or sped up, and where children run (never part of what they compute);
# num_workers is one only for the tensor pipeline
VOLATILE = ("log_every", "resume_run_id", "env_manager", "num_workers", "force", "promote", "data_dir",
            "download", "checkpoint_every", *SECTIONS["execution"], *TUNING_EXECUTION, *SPEED)
# what the data digest counts already: the files' bytes (a synthetic set's size makes other bytes;
# verify only checks them)
DATA_MADE = ("verify", "synthetic_train", "synthetic_test")
# main's caps: the key holds the epochs and repeats they leave (config.apply_caps), so a cap that
# cuts nothing (main -P epochs=30 at scale=demo) keeps the key of the run without it
CAPS = ("max_epochs", "max_repeats")
# the choices as given (auto|cpu|cuda, auto|fp32|bf16): the key holds what they resolve to, so
# -P device=cpu on a machine without a GPU is the run that device=auto made there
RESOLVED = ("device", "precision")


def hash_code() -> str:
    """Hash of the code and default params as they are on disk now: a changed file invalidates
    reused runs."""
    digest = hashlib.sha256()
    files = sorted((PROJECT_DIR / "pipeline").glob("*.py")) + sorted(PARAMS_DIR.glob("*.yaml"))
    files.append(PROJECT_DIR / "MLproject")
    for path in files:
        if path.exists():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The version of the code this process runs: hash_code() when the process first asks (the CLI
    asks as it starts), kept for its life. An edit or a `git pull` while it trains never gives its
    later runs, keys and resume checks a version they are not running. (A Ray worker keeps the one
    it imported; the driver refuses a worker whose version is not its own.)"""
    return hash_code()


def changes_the_result(cfg: Config) -> frozenset[str]:
    """The VOLATILE params that do change this config's result: num_workers under the torchvision
    pipeline, whose DataLoader workers draw crops and rotations from their own seeds."""
    return frozenset({"num_workers"}) if cfg.data_pipeline == "torchvision" else frozenset()


def training_key(cfg: Config, data_digest: str, runtime: Runtime, code: str = "") -> str:
    """Hash of everything that decides a result: params, code version (`code`, else this process's),
    the data's digest, and the device type and precision the stage runs with."""
    params = apply_caps(dataclasses.replace(cfg)).to_params()  # a copy: apply_caps sets its fields
    for volatile in (*VOLATILE, *DATA_MADE, *RESOLVED, *CAPS):
        if volatile not in changes_the_result(cfg):
            params.pop(volatile, None)
    params.update(data_digest=data_digest, device_type=runtime.device_type,
                  resolved_precision=runtime.precision)
    text = yaml.safe_dump(params, sort_keys=True) + (code or code_version())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def study_key(cfg: Config, data_digest: str, runtime: Runtime) -> str:
    """The training key less how far a study goes (n_trials, epoch_budget): what a child trains
    and which study (or stage) it belongs to. A FINISHED stage is reused by its training_key,
    which keeps both: a study asked for 3 trials is not the one that ran 2."""
    return training_key(cfg.replace(n_trials=1, epoch_budget=0), data_digest, runtime)


def child_key(cfg: Config, data_digest: str, runtime: Runtime, name: str, init_source: str) -> str:
    """A child's training_key: its own config, its data, its place in the stage (name), and the
    run its weights come from (phase 2 depends on phase 1's run)."""
    text = f"{study_key(cfg, data_digest, runtime)}|{name}|{init_source}"  # n_trials changes no trial
    return hashlib.sha256(text.encode()).hexdigest()[:16]
