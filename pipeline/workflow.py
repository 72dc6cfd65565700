"""`main`: the whole study in order, each stage's parent being the stage before it.

A stage whose FINISHED run already matches its params, parent run and code version (tag
training_key) is reused without starting a process; otherwise it runs as its own
`mlflow run` entry point. A changed stage gets a new run id, which changes the parent_run_id
of every stage after it, so they all run again.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow

from . import config as config_mod
from . import data as data_mod
from . import checkpoints, keys, plots, tracking, tuning
from .config import Config
from .errors import ConfigError
from .lineage import tuned_by_parent
from .runner import log
from .runtime import Runtime

UNDER_MAIN = "SVHN_MAIN_RUN_ID"

CHAIN = ["model_selection", "baseline", "tune_lr", "tune_gamma", "overfit", "retrain", "deepen"]
# -P tuner=optuna: one Optuna study from the baseline's checkpoint instead of the seed's three sweeps
CHAINS = {"seed": CHAIN,
          "optuna": ["model_selection", "baseline", "autotune", "retrain", "deepen"]}

SECTIONS = config_mod.SECTIONS
# What `main` hands on to every stage, by section; epochs and repeats become caps.
SHARED = (*SECTIONS["scale"], *SECTIONS["data"], *SECTIONS["hardware"], *SECTIONS["execution"],
          "patience", "registered_model", "checkpoint_every", "force")
AS_CAPS = {"epochs": "max_epochs", "repeats": "max_repeats"}
MAIN_ONLY = SECTIONS["main"]
# what main hands on to autotune alone, with -P tuner=optuna: how far its study goes, where it is kept
FOR_AUTOTUNE = SECTIONS["study"]


def autotune_overrides(overrides: dict[str, str]) -> dict[str, str]:
    given = {k: v for k, v in overrides.items() if k in FOR_AUTOTUNE}
    if given and overrides.get("tuner", "seed") != "optuna":
        raise ConfigError(f"main passes {', '.join(given)} to the autotune stage, which runs with "
                          f"-P tuner=optuna only: add it, or drop {', '.join(given)}")
    if "optuna_storage" in given:  # as main's working directory reads it (the stage runs in the project's)
        given["optuna_storage"] = tuning.absolute_sqlite(given["optuna_storage"])
    return given


def tighter(cap: str | None, other: str) -> str:
    """Two caps as one: the smaller, where 0 is none."""
    caps = [c for c in (cap, other) if c is not None and int(float(c))]
    return min(caps, key=lambda c: int(float(c))) if caps else other


def stage_overrides(overrides: dict[str, str]) -> dict[str, str]:
    shared = {}
    for key, value in overrides.items():
        if key in AS_CAPS or key in AS_CAPS.values():  # -P epochs=5 -P max_epochs=10: 5, in either order
            cap = AS_CAPS.get(key, key)
            shared[cap] = tighter(shared.get(cap), value)
        elif key == "data_dir" and value:  # the stages run in the project folder, main maybe elsewhere
            shared[key] = str(config_mod.absolute(value))
        elif key in SHARED:
            shared[key] = value
        elif key == "resume_run_id":
            raise ConfigError("main continues by itself: run the same main command again (finished stages "
                              "are reused, a stopped one resumed); -P resume_run_id continues one stage's run alone")
        elif key == "parent_run_id":
            raise ConfigError("main starts each stage from the one before it: to start a stage from a run of "
                              "yours, run that stage alone with -P parent_run_id=...")
        elif key not in MAIN_ONLY + FOR_AUTOTUNE:
            raise ConfigError(f"main does not pass '{key}' on to the stages: set it in "
                              f"params/<stage>.yaml or run that stage alone with -P {key}=...")
    return shared


def stage_parameters(stage: str, overrides: dict[str, str], parent: str = "") -> dict[str, str]:
    """What main hands `stage`: the values it passes on, the parent run, autotune's study values,
    and registered_model only where the stage registers (so it invalidates only those). Every
    key main cannot pass on is refused here, whichever the stage."""
    shared, for_autotune = stage_overrides(overrides), autotune_overrides(overrides)
    parameters = dict(shared, **({"parent_run_id": parent} if parent else {}),
                      **(for_autotune if stage == "autotune" else {}))
    if not config_mod.registers(stage):
        parameters.pop("registered_model", None)
    return parameters


def check_caps_main_makes(overrides: dict[str, str]) -> None:
    """-P trial_epochs=5 with main's -P epochs=2, said in main's words: main hands its stages
    -P epochs as the cap max_epochs, which the stage's own refusal would name."""
    shared = stage_overrides(overrides)
    for given, cap in AS_CAPS.items():
        for name in config_mod.CAPPED[cap]:
            if name not in overrides or cap not in shared:
                continue
            try:
                cut = 0 < float(shared[cap]) < float(overrides[name])
            except ValueError:
                continue  # not a number: the stage's config says so
            if cut:
                by = given if overrides.get(given) == shared[cap] else cap
                raise ConfigError(f"-P {name}={overrides[name]} with -P {by}={shared[cap]}: main caps every stage at "
                                  f"{shared[cap]} {given}, so {name} would be {shared[cap]} while its param reads "
                                  f"{overrides[name]}; pass -P {name}={shared[cap]}, or raise -P {by}")


def check_chain(tuner: str, overrides: dict[str, str]) -> None:
    """Each stage's config as the stage will load it (its yaml, the scale, the caps), before any
    run exists; with tuner=optuna, retrain must train autotune's lr under the schedule it was
    tuned with (lineage.tuned_by_parent refuses it only once the study has run)."""
    check_caps_main_makes(overrides)
    loaded = {stage: config_mod.load(stage, stage_parameters(stage, overrides)) for stage in CHAINS[tuner]}
    if tuner == "optuna" and loaded["autotune"].lr_schedule != loaded["retrain"].lr_schedule:
        raise ConfigError(f"autotune would tune lr with lr_schedule={loaded['autotune'].lr_schedule} and retrain "
                          f"train it with lr_schedule={loaded['retrain'].lr_schedule}: set the same lr_schedule "
                          f"in params/autotune.yaml and params/retrain.yaml (main passes none on)")


def run_stage(stage: str, parameters: dict[str, str], cfg: Config, experiment_id: str, resolved: Runtime) -> str:
    stage_cfg = config_mod.load(stage, parameters)  # the stage's own config: fail fast if invalid
    stage_cfg, _ = tuned_by_parent(stage_cfg, frozenset(parameters))  # as the stage will resolve it
    # the stage runs in a process of its own, so with the code on disk now (not main's, if it changed)
    key = keys.training_key(stage_cfg, data_mod.data_digest(stage_cfg), resolved, code=keys.hash_code())
    found = tracking.find_finished_run(experiment_id, key)
    if found and not checkpoints.holds_weights(found.info.run_id):
        log(f"[main] {stage}: FINISHED run {found.info.run_id} has lost its {checkpoints.BEST} (deleted?): "
            f"running the stage again")
        tracking.supersede(found.info.run_id, key)
        found = None
    if found:
        log(f"[main] {stage}: reusing FINISHED run {found.info.run_id} "
            f"(same params, parent run, data, device, precision and code version)")
        return found.info.run_id
    log(f"[main] {stage}: starting `mlflow run -e {stage}` with {parameters}")
    # MLflow makes a folder under storage_dir on every run and never removes it: ours goes
    with tempfile.TemporaryDirectory(prefix="svhn-stage-") as storage:
        submitted = mlflow.projects.run(str(config_mod.PROJECT_DIR), entry_point=stage,
                                        parameters=parameters, env_manager=cfg.env_manager,
                                        experiment_id=experiment_id, storage_dir=storage,
                                        synchronous=True)
    return submitted.run_id


def main(cfg: Config, overrides: dict[str, str], main_run_id: str, resolved: Runtime) -> list[dict]:
    """The chain, each stage keyed with `resolved` (main's device and precision, which it passes
    on to every stage)."""
    client = tracking.client()
    experiment_id = client.get_run(main_run_id).info.experiment_id
    client.set_tag(main_run_id, "stage", "main")
    tracking.log_config(main_run_id, cfg, resolved.params(cfg.bs, cfg.data_pipeline))
    tracking.log_datasets(main_run_id, data_mod.load(cfg))  # the data the whole study sees
    os.environ[UNDER_MAIN] = main_run_id  # stage processes leave the "continue with" hint to main
    split = cfg.selects_on
    rows, parent = [], ""
    for stage in CHAINS[cfg.tuner]:
        run_id = run_stage(stage, stage_parameters(stage, overrides, parent), cfg, experiment_id, resolved)
        run = client.get_run(run_id)
        rows.append({"stage": stage, "run_id": run_id,
                     "run_name": run.data.tags.get("mlflow.runName", stage),
                     "best_acc": run.data.metrics.get(f"best_{split}_acc", float("nan")),
                     "test_acc_at_best": run.data.metrics.get("test_acc_at_best", float("nan")),
                     "arch": run.data.tags.get("arch", ""),
                     "source_run_id": run.data.tags.get("source_run_id", ""),
                     "from_parent_weights": run.data.tags.get("init_from", "scratch") != "scratch",
                     "best_child_run_id": run.data.tags.get("best_child_run_id", "")})
        client.set_tag(main_run_id, f"run_{stage}", run_id)
        parent = run_id
    log_study(main_run_id, experiment_id, rows, split, cfg.model_name)
    return rows


def champion_source(registered_model: str) -> tuple[str, str]:
    """(run id, "name vN") of the registered model's `champion`, or ("", "") when it has none."""
    from mlflow.exceptions import MlflowException

    try:
        version = tracking.client().get_model_version_by_alias(registered_model, "champion")
    except MlflowException as err:
        tracking.raise_if_refused(err)
        return "", ""
    return version.run_id, f"{registered_model} v{version.version}"


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to the run that works inside the MLflow UI (and after its address)."""
    return f"[{run_id}](#/experiments/{experiment_id}/runs/{run_id})" if run_id else ""


def log_study(main_run_id: str, experiment_id: str, rows: list[dict], split: str,
              registered_model: str) -> None:
    """summary.md (each stage linked to its run) and plots/study.png (the study at a glance)."""
    client = tracking.client()
    champion_run, champion = champion_source(registered_model)
    for row in rows:
        row["children"] = len(client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{row['run_id']}'", max_results=1000))
        row["champion"] = champion if row["run_id"] == champion_run else ""
    known = {r["run_id"]: f"{r['stage']} " for r in rows}
    lines = ["# SVHN study", "", f"Selection on the {'validation' if split == 'val' else 'test'} split. "
             "Each run id opens that run in the MLflow UI; `plots/study.png` shows the study at a glance.", "",
             f"| stage | run | arch | best {split} acc (%) | test acc at best (%) | children "
             "| parent (source_run_id) | best child |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parent = r["source_run_id"]
        parent_cell = (known.get(parent, "") + run_link(experiment_id, parent)
                       if parent and parent != "scratch" else parent)
        star = " \u2605 champion" if r["champion"] else ""
        lines.append(f"| {r['stage']}{star} | "
                     f"{run_link(experiment_id, r['run_id'])} | {r['arch']} | {r['best_acc']:.3f} | "
                     f"{r['test_acc_at_best']:.3f} | {r['children']} | {parent_cell} | "
                     f"{run_link(experiment_id, r['best_child_run_id'])} |")
    best = max(rows, key=lambda r: r["best_acc"])
    lines += ["", f"Best: {best['stage']} ({run_link(experiment_id, best['run_id'])}), {split} "
              f"{best['best_acc']:.3f}%, test {best['test_acc_at_best']:.3f}% at that checkpoint."]
    winner = next((r for r in rows if r["champion"]), None)
    if winner:
        lines.append(f"Champion: {champion} (alias `champion`), registered by {winner['stage']} "
                     f"({run_link(experiment_id, champion_run)}): {split} {winner['best_acc']:.3f}%, "
                     f"test {winner['test_acc_at_best']:.3f}%.")
    elif champion:
        lines.append(f"Champion: {champion} (alias `champion`) comes from run {champion_run}, outside "
                     f"this study: the registering stages here left it there (their runs' output says "
                     f"whether they were compared with it, and how).")
    client.log_text(main_run_id, "\n".join(lines) + "\n", "summary.md")
    with tempfile.TemporaryDirectory() as tmp:
        title = f"SVHN study, main run {main_run_id[:8]}: stages in order, each from its parent"
        client.log_artifact(main_run_id, str(plots.study(rows, Path(tmp) / "study.png", split, title)),
                            "plots")
    tracking.log_epoch(main_run_id, 0, {f"best_{split}_acc": best["best_acc"],
                                        "test_acc_at_best": best["test_acc_at_best"]})
    log("\n".join(lines))
