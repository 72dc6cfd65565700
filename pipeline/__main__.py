"""The one CLI: `python -m pipeline STAGE [--key value ...]`, what every MLproject entry point runs.

Errors the user can fix (bad parameter, missing data, unusable parent run or checkpoint,
unreadable input, a 401/403 from the tracking server) print one line and exit 2; a
SIGINT/SIGTERM marks the open runs KILLED and says how to resume.
"""
from __future__ import annotations

import gc
import os
import sys

USAGE = "usage: python -m pipeline STAGE [--key value ...]   (STAGE: {stages})"


def parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    from .config import STAGES
    from .errors import ConfigError

    if not argv or argv[0] in ("-h", "--help"):
        raise ConfigError(USAGE.format(stages="|".join(STAGES)))
    stage, rest, overrides = argv[0], argv[1:], {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument '{token}': {USAGE.format(stages='|'.join(STAGES))}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"parameter --{key} has no value: pass --{key} VALUE (or -P {key}=VALUE)")
            value, i = rest[i + 1], i + 1
        name = key.replace("-", "_")
        if name in overrides and overrides[name] != value:  # which one would win is no answer to give
            raise ConfigError(f"parameter {name} given twice ({overrides[name]} and {value}): give it once")
        overrides[name] = value
        i += 1
    return stage, overrides


def continue_command(stage: str, overrides: dict[str, str]) -> str:
    """The same command again: run again, it reuses what finished and resumes what did not."""
    import shlex

    params = " ".join(f"-P {shlex.quote(f'{k}={v}')}" for k, v in overrides.items() if k != "force")
    env_manager = overrides.get("env_manager", "local")
    # `mlflow run` tells its command the experiment (--experiment-name svhn-demo): reuse looks there only
    experiment = os.environ.get("MLFLOW_EXPERIMENT_ID", "")
    where = f" --experiment-id {shlex.quote(experiment)}" if experiment else ""
    return f"mlflow run . -e {stage}{where} --env-manager {env_manager} {params}".rstrip()


def run(stage: str, overrides: dict[str, str]) -> int:
    from . import config, interrupts, keys, runtime, session, workflow
    from . import predict as predict_mod
    from .cluster import check_before_runs

    keys.code_version()  # the code this process runs, read as it starts: every run of it records that one
    interrupts.install()
    runtime.tune_allocator()  # before the first tensor: MyVgg's epoch on CPU took 1.6x as long without
    cfg = config.load(stage, overrides)  # every value checked before any work
    if stage == "main":  # and what main hands its stages, before main's run exists
        workflow.check_chain(cfg.tuner, overrides)
    checks = []
    if stage == "autotune" or (stage == "main" and cfg.tuner == "optuna"):
        import mlflow

        from .tuning import reachable_storage

        # its own store: not the MLflow db, and reachable where trials run (main: before baseline trains)
        checks.append(lambda: reachable_storage(cfg, mlflow.get_tracking_uri()))
    check_before_runs(cfg, *checks)  # executor=ray: stores every node reaches, children that fit a node
    # main's stages run with what it resolves here (device=cuda on a machine without one: stop now)
    resolved = runtime.of(cfg) if stage == "main" else None
    if stage in ("main", "predict", "evaluate"):
        # a model in another format than pt2, an input that is not there, an output predict cannot
        # write or data that is not there is refused before this command makes a run
        if stage == "predict":
            predict_mod.input_path(cfg.input)
            predict_mod.writable_output(cfg.output, cfg.input)
        if stage != "predict":  # the data main and evaluate read: missing, it is one line and no run
            from . import data

            data.data_files(cfg)
        model, model_uri = predict_mod.load_model(cfg.champion_uri) if stage != "main" else (None, "")
        run_id, created = session.top_level_run()
        from . import runner, tracking

        tracking.client().set_tag(run_id, "mlflow.runName", stage)
        if model_uri:  # the one version whose figures these are, whatever the alias does later
            tracking.client().set_tag(run_id, "model_uri", model_uri)
        with runner.opened(run_id, end=created):
            if stage == "main":
                workflow.main(cfg, overrides, run_id, resolved)
                return 0
            if stage == "evaluate":
                predict_mod.evaluate(cfg, run_id, model)
                return 0
            return predict_mod.predict(cfg, run_id, model)
    if cfg.resume_run_id:
        session.resume(cfg, given=frozenset(overrides))
    else:
        session.run(cfg, given=frozenset(overrides))
    return 0


def main_prints_the_command(stage: str) -> bool:
    """A stage that `main` started leaves the command that continues to main: one command, main's."""
    from .workflow import UNDER_MAIN

    return stage != "main" and bool(os.environ.get(UNDER_MAIN))


def interrupted(stopped: KeyboardInterrupt, stage: str, overrides: dict[str, str]) -> int:
    """One line on stderr: which run was marked KILLED and the command that continues it."""
    from .interrupts import killed_runs

    killed = killed_runs(stopped)
    signal_name = str(stopped) or "a signal"
    if not killed:
        print(f"interrupted ({signal_name}) before training started", file=sys.stderr, flush=True)
        return 130
    if main_prints_the_command(stage):
        print(f"interrupted ({signal_name}): run {killed[-1]} marked KILLED", file=sys.stderr, flush=True)
        return 130
    if stage == "train" and "resume_run_id" not in overrides and not resumable(killed[-1]):
        # stopped in its first epoch: nothing to continue from, the same command starts afresh
        print(f"interrupted ({signal_name}): run {killed[-1]} marked KILLED before its first epoch ended, "
              f"so it has no checkpoint to resume from. Start again with the same command: "
              f"{continue_command(stage, overrides)}", file=sys.stderr, flush=True)
        return 130
    if stage == "train":  # one run, no children: it continues in place from its last.pt
        overrides = {"resume_run_id": killed[-1],
                     **({"env_manager": overrides["env_manager"]} if "env_manager" in overrides else {})}
    print(f"interrupted ({signal_name}): run {killed[-1]} marked KILLED; "
          f"finished runs are kept and the interrupted one resumes from its last checkpoint. "
          f"Continue with the same command: {continue_command(stage, overrides)}",
          file=sys.stderr, flush=True)
    return 130


def resumable(run_id: str) -> bool:
    """Whether a stopped train run wrote the last.pt that resume_run_id continues from (assumed,
    when the store cannot say: the resume then explains itself)."""
    from . import checkpoints, tracking

    try:
        return tracking.has_artifact(run_id, checkpoints.LAST)
    except Exception:  # noqa: BLE001 - a store gone mid-interrupt must not hide the hint
        return True


def stopped_runs_hint(err: BaseException, stage: str, overrides: dict[str, str]) -> None:
    """After an error that stopped runs on its way up (a driver's children marked KILLED), or that
    ended `main` in one of its stages (whose process leaves the hint to main): the command that
    continues them."""
    from .interrupts import killed_runs

    if main_prints_the_command(stage):
        return
    killed = killed_runs(err)
    if killed:
        print(f"runs {', '.join(killed)} marked KILLED; finished runs are kept and the stopped ones resume from "
              f"their last checkpoints. Continue with the same command: {continue_command(stage, overrides)}",
              file=sys.stderr, flush=True)
    elif stage == "main":
        print(f"main stopped; finished stages and children are kept and the stopped ones resume from their "
              f"last checkpoints. Continue with the same command: {continue_command(stage, overrides)}",
              file=sys.stderr, flush=True)


PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def main(argv: list[str] | None = None) -> int:
    # false unless the user set it (as importing pipeline sets it, again here for a caller that
    # unset it since), inherited by every process this one starts (stages, Ray workers)
    os.environ.setdefault(PICKLE, "false")
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is written \udce9, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if os.environ[PICKLE].lower() in ("true", "1"):
        print(f"note: {PICKLE}={os.environ[PICKLE]} (set by you): MLflow may unpickle what it loads; "
              f"this pipeline still loads pt2 models and weights-only checkpoints only", flush=True)
    import requests
    from mlflow.exceptions import MlflowException

    from .errors import UserError, first_line
    from .interrupts import killed_runs
    from .urls import scrubbed

    stage, overrides = "", {}
    try:
        stage, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        return run(stage, overrides)
    except UserError as err:  # what the user can fix: one line (a failed Ray child: its run is FAILED)
        print(f"error: {scrubbed(str(err))}", file=sys.stderr, flush=True)
        if killed_runs(err):  # a failed Ray child's siblings, stopped with it
            stopped_runs_hint(err, stage, overrides)
        return err.exit_code
    except KeyboardInterrupt as stopped:
        return interrupted(stopped, stage, overrides)
    except (MlflowException, requests.HTTPError) as err:
        from .tracking import server_refusal

        refusal = server_refusal(err)  # a 401/403: who, for what, and what to set
        # anything else is the store's own failure (an artifact upload's 413 or 500 too): its first
        # line, whose URL names the server with any password in it
        print(f"error: {refusal or first_line(err, None, type(err).__name__)}", file=sys.stderr, flush=True)
        stopped_runs_hint(err, stage, overrides)
        return 2 if refusal else 1
    except Exception as err:  # a bug: its traceback follows, and the runs it stopped can continue
        stopped_runs_hint(err, stage, overrides)
        raise


def import_without_collecting() -> None:
    """Import what a command runs (torch, MLflow, every stage) with the collector off, then freeze
    it: those some 600,000 objects live as long as the process, and the collector's passes over them
    while they were made took about 1 s of every stage process. The collector is on again after."""
    import importlib

    gc.disable()
    try:
        for module in ("requests", "mlflow.exceptions"):  # what main() and run() import
            importlib.import_module(module)
        for module in ("cluster", "config", "interrupts", "keys", "predict", "runtime", "session", "workflow"):
            importlib.import_module(f"pipeline.{module}")
    finally:
        gc.freeze()
        gc.enable()


def exit_with(code: int) -> None:
    """Exit with `code`, the collector's work skipped: at exit the interpreter collects again and
    again over every object this process made (about 630,000 after torch, MLflow and a run), which
    took 2.3 s of CPU at the end of every stage process. Frozen, they are left to the exit itself;
    atexit handlers (MLflow's, Ray's, temp folders') run as before."""
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # the process's own entry; main() and run() leave the collector alone
    try:
        import_without_collecting()
    except KeyboardInterrupt as stopped:  # Ctrl-C while importing: one line, as main() says it
        exit_with(interrupted(stopped, "", {}))
    exit_with(main())
