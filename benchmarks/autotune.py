"""The seed's hand-tuned chain against one Optuna study, on the same budget in epochs.

Both start from the same parent: a `train` run from scratch (the baseline's role). Then
  chain:    tune_lr (the seed's 5 learning rates) -> tune_gamma -> overfit, each point `--epochs`
            epochs, each stage from the previous stage's best checkpoint, as `main` runs them;
  autotune: one study from the parent, trial_epochs = `--epochs` and n_trials = the chain's
            number of children, so its budget (n_trials x trial_epochs) is the chain's; pruning
            ends hopeless trials early, so it spends at most that.
Selection on a validation split (val_split 0.1) in both arms, so the test figure is fair. Reports,
per arm: the best validation accuracy reached, the test accuracy of that checkpoint, the epochs
trained (logged test_acc steps of every child) and the wall time. Synthetic data, temporary store.

    python benchmarks/autotune.py [--train 2000] [--test 1000] [--epochs 2] [--executor local|ray]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--train", default="2000", help="synthetic training images")
    parser.add_argument("--test", default="1000", help="synthetic test images")
    parser.add_argument("--parent-epochs", default="3")
    parser.add_argument("--epochs", type=int, default=2, help="per sweep point, and trial_epochs")
    parser.add_argument("--bs", default="64", help="the chain's batch size; overfit halves it, as the seed")
    parser.add_argument("--executor", default="local", help="local, or ray (children as Ray tasks)")
    parser.add_argument("--seed", default="1412")
    args = parser.parse_args()
    import mlflow

    from pipeline import tracking

    with tempfile.TemporaryDirectory() as tmp:
        uri = tracking.new_local_store(Path(tmp))
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        env.pop("MLFLOW_RUN_ID", None)
        client = mlflow.MlflowClient(uri)
        data = ["--dataset", "synthetic", "--data_dir", f"{tmp}/data", "--synthetic_train", args.train,
                "--synthetic_test", args.test, "--val_split", "0.1", "--log_every", "1000", "--seed", args.seed]
        execution = ["--executor", args.executor]

        def stage(name: str, *extra: str) -> tuple[str, float]:
            cmd = [sys.executable, "-m", "pipeline", name, *data, *extra]
            print("$ " + " ".join(cmd[1:]), flush=True)
            start = time.monotonic()
            subprocess.run(cmd, cwd=PROJECT, env=env, check=True, stdout=subprocess.DEVNULL)
            runs = client.search_runs(["0"], f"tags.stage = '{name}'", order_by=["attributes.start_time DESC"])
            top = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)  # not one of its children
            return top.info.run_id, time.monotonic() - start

        def epochs_of(run_ids: list[str]) -> int:
            return sum(len(client.get_metric_history(child.info.run_id, "test_acc"))
                       for run_id in run_ids
                       for child in client.search_runs(["0"], f"tags.mlflow.parentRunId = '{run_id}'"))

        parent, _ = stage("train", "--bs", args.bs, "--epochs", args.parent_epochs, "--init", "scratch")
        epochs = str(args.epochs)
        lr_run, lr_s = stage("tune_lr", "--parent_run_id", parent, "--epochs", epochs, "--bs", args.bs, *execution)
        gamma_run, gamma_s = stage("tune_gamma", "--parent_run_id", lr_run, "--epochs", epochs, "--bs", args.bs,
                                   *execution)
        overfit_run, overfit_s = stage("overfit", "--parent_run_id", gamma_run, "--epochs", epochs,
                                       "--bss", str(int(args.bs) // 2), *execution)
        chain = [lr_run, gamma_run, overfit_run]
        chain_children = sum(len(client.search_runs(["0"], f"tags.mlflow.parentRunId = '{r}'")) for r in chain)
        bss = ",".join(str(int(int(args.bs) * f)) for f in (0.5, 1, 2))
        tuned, tuned_s = stage("autotune", "--parent_run_id", parent, "--trial_epochs", epochs,
                               "--n_trials", str(chain_children), "--startup_trials", "3",
                               "--prune_warmup_epochs", "1", "--bss", bss, *execution)
        rows = []
        for name, final, runs, seconds in (("seed chain (tune_lr -> tune_gamma -> overfit)", overfit_run, chain,
                                            lr_s + gamma_s + overfit_s),
                                           ("autotune (Optuna TPE + median pruner)", tuned, [tuned], tuned_s)):
            best = max((client.get_run(r) for r in runs), key=lambda r: r.data.metrics["best_val_acc"])
            rows.append((name, best.data.metrics["best_val_acc"], best.data.metrics["test_acc_at_best"],
                         client.get_run(final).data.metrics["best_val_acc"], epochs_of(runs),
                         chain_children * args.epochs, seconds))
        tags = client.get_run(tuned).data.tags
    print(f"\nexecutor={args.executor}, {args.train} synthetic training images (10% held out for "
          f"validation), {args.test} test; parent: train {args.parent_epochs} epochs from scratch")
    print("\n| arm | best val acc (%) | test acc at that checkpoint (%) | final stage's val acc (%) "
          "| epochs trained / budget | wall time (s) |\n|---|---|---|---|---|---|")
    for name, val, test, final, spent, budget, seconds in rows:
        print(f"| {name} | {val:.2f} | {test:.2f} | {final:.2f} | {spent} / {budget} | {seconds:.0f} |")
    print(f"\nautotune's best: lr={tags['best_lr']} gamma={tags['best_gamma']} wd={tags['best_wd']} "
          f"bs={tags['best_bs']} ({tags['trials_complete']} complete, {tags['trials_pruned']} pruned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
