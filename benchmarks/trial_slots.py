"""Idle slot time and trials per hour of autotune on Ray: asynchronous trials against the
synchronous batches they replaced, on a toy study with 2 one-CPU slots.

    .venv/bin/python benchmarks/trial_slots.py [--project DIR] [--seeds 1412,1413] [--trials 8]

--project: the checkout whose `mlflow run . -e autotune` is timed (default: this one). A worktree
of the commit before asynchronous trials gives the batch figures:
    git worktree add /tmp/batch 710d5c4 && .venv/bin/python benchmarks/trial_slots.py --project /tmp/batch

From MLflow's record of each trial's child run (start and end times): busy = the sum of the
children's durations; span = first child start to last child end; idle slot time = slots x span
- busy; trials per hour = trials / span. Ray's start-up is outside the span.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SLOTS = 2


def run_study(project: Path, root: Path, seed: int, args) -> dict:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(project))
    env.pop("MLFLOW_RUN_ID", None)
    params = {"init": "scratch", "dataset": "synthetic", "synthetic_train": 2000, "synthetic_test": 500,
              "limit_train": args.train, "limit_test": 256, "data_dir": root / "data", "bss": 64,
              "n_trials": args.trials, "trial_epochs": args.epochs, "pruner": "median", "startup_trials": 2,
              "prune_warmup_epochs": 1, "seed": seed, "log_every": 1000, "executor": "ray",
              "cpus_per_trial": 1, "trial_batch": SLOTS}
    cmd = [str(BIN / "mlflow"), "run", str(project), "-e", "autotune", "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"autotune failed:\n{proc.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (stage,) = [r for r in client.search_runs(["0"], "tags.stage = 'autotune'") if "mlflow.parentRunId" not in r.data.tags]
    children = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    starts = [c.info.start_time / 1000 for c in children]
    ends = [c.info.end_time / 1000 for c in children]
    busy = sum(e - s for s, e in zip(starts, ends))
    span = max(ends) - min(starts)
    pruned = sum(c.data.tags.get("pruned") == "true" for c in children)
    return {"trials": len(children), "pruned": pruned, "span": span, "busy": busy,
            "idle": SLOTS * span - busy, "per_hour": len(children) / span * 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=PROJECT)
    parser.add_argument("--seeds", default="1412,1413")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=512)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.project, capture_output=True,
                            text=True).stdout.strip()
    print(f"project {args.project} at {commit}, {os.cpu_count()} CPUs, {SLOTS} slots of 1 CPU, "
          f"{args.trials} trials of up to {args.epochs} epochs, {args.train} training images")
    print("| seed | trials (pruned) | span s | busy slot s | idle slot s | idle share | trials per hour |")
    print("|---|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            r = run_study(args.project, Path(tmp), seed, args)
        print(f"| {seed} | {r['trials']} ({r['pruned']}) | {r['span']:.1f} | {r['busy']:.1f} | {r['idle']:.1f} | "
              f"{r['idle'] / (SLOTS * r['span']):.0%} | {r['per_hour']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
