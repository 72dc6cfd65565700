"""Wall time of one stage with executor=local against executor=ray, in one session.

Runs `mlflow run . -e tune_lr` (4 learning rates, 2 epochs, 2,000 synthetic training images by
default) with each executor in turn against one temporary SQLite store, and prints the wall time
of each command, Ray's start-up included, and the children's summed training time.

    .venv/bin/python benchmarks/ray_executor.py [--rounds 1] [--train 2000] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_stage(root: Path, executor: str, args) -> tuple[float, float, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("MLFLOW_RUN_ID", None)
    params = {"init": "scratch", "dataset": "synthetic", "synthetic_train": args.train, "synthetic_test": 500,
              "data_dir": root / "data", "lrs": "0.001,0.0005,0.0002,0.0001", "epochs": args.epochs,
              "bs": 64, "log_every": 1000, "executor": executor,
              **({"cpus_per_trial": 1} if executor == "ray" else {})}  # refused where nothing places children
    cmd = [str(BIN / "mlflow"), "run", str(PROJECT), "-e", "tune_lr", "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    stage = next(r for r in client.search_runs(["0"], "tags.stage = 'tune_lr'",
                                                order_by=["attributes.start_time DESC"])
                 if "mlflow.parentRunId" not in r.data.tags)
    children = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    return wall, sum(c.data.metrics["total_time_s"] for c in children), stage.data.params["torch_threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| round | executor | wall s (command) | children's training s (sum) | torch threads (driver) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        from pipeline import config, data  # the synthetic set is written before either is timed

        data.load(config.load("train", {"dataset": "synthetic", "synthetic_train": args.train,
                                        "synthetic_test": 500, "data_dir": str(Path(tmp) / "data")}))
        for round_ in range(1, args.rounds + 1):
            for executor in ("local", "ray"):
                wall, trained, threads = run_stage(Path(tmp), executor, args)
                print(f"| {round_} | {executor} | {wall:.1f} | {trained:.1f} | {threads} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
