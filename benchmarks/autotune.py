"""The seed's hand-tuned chain against one Optuna study on half its epochs, paired by seed.

For each seed, both arms start from the same parent: a `train` run from scratch (the baseline's
role, `--parent-epochs`). Then
  chain:    tune_lr (the seed's 5 learning rates) -> tune_gamma -> overfit, `--epochs` E a point,
            each stage from the previous stage's best checkpoint, as `main` runs them (7 children,
            7E epochs);
  autotune: one study from the parent with epoch_budget = half the chain's epochs: it asks for
            no trial that could take the epochs actually trained (pruned trials included) past
            that. Trial 0 is the seed's point (start_from_seed), then multivariate TPE; Hyperband
            prunes from epoch 1 (trial_epochs the resource), and each pruned epoch saved buys more.
            Each trial starts where --trials-from says: the parent, or the best complete trial
            so far (trials_from=best: the study compounds depth as the chain does).
Everything at the demo scale (`scale=demo`: 3,000 synthetic training images, bs 32, overfit at 16),
selection on a 10% validation split in both arms, so the test figure is fair. Reports per seed
and arm the best validation accuracy, the test accuracy of that checkpoint, the epochs trained
(logged test_acc steps of every child) and the wall time; then each arm's mean and the paired
difference (autotune - chain) with its 95% interval (Student t, n-1 degrees of freedom), and how
much the chain's children gained in their last epoch (has the curve levelled at E?).

    python benchmarks/autotune.py [--seeds 1412,1413,1414] [--epochs 8] [--trial-epochs 8]
                                  [--data synthetic|colour] [--executor local|ray]
                                  [--trials-from parent|best] [--lr-schedule constant|cosine]
                                  [--arms chain,autotune]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
CHAIN_POINTS = 7  # tune_lr's 5 learning rates, tune_gamma's 1, overfit's 1


def colour_folder(root: Path) -> Path:
    """The tests' colour-coded digits (each digit its own colour, plus noise) in SVHN's format, at
    the demo's size: 3,000 training and 1,000 test images."""
    sys.path.insert(0, str(PROJECT / "tests"))
    from support.digits import colour_images, svhn_labels

    from pipeline import synthetic

    for split, count, seed in (("train", 3000, 1), ("test", 1000, 2)):
        images, labels = colour_images(count, seed)
        synthetic.write_mat(root / f"{split}_32x32.mat", images, svhn_labels(labels))
    return root


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (learnability.mean_ci's)."""
    from learnability import mean_ci  # a script beside this one

    mean, _, low, high = mean_ci(values)
    return mean, (high - low) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seeds", default="1412,1413,1414", help="paired seeds, comma-separated")
    parser.add_argument("--parent-epochs", default="4", help="the parent's epochs (the demo's baseline: 4)")
    parser.add_argument("--epochs", type=int, default=8, help="E: the chain's epochs a point (8: levelled)")
    parser.add_argument("--trial-epochs", type=int, default=8, help="autotune's trial_epochs")
    parser.add_argument("--data", default="synthetic", help="synthetic (the demo's), or colour (the tests' digits)")
    parser.add_argument("--executor", default="local", help="local, or ray (children as Ray tasks)")
    parser.add_argument("--trials-from", default="parent", help="autotune's trials_from: parent, or best")
    parser.add_argument("--lr-schedule", default="constant",
                        help="autotune's lr_schedule: constant (the seed's, as the chain), or cosine within each trial")
    parser.add_argument("--arms", default="chain,autotune",
                        help="which arms to run (a pilot of one arm reports no paired difference)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if not arms or len(set(arms)) != len(arms) or not set(arms) <= {"chain", "autotune"}:
        parser.error(f"--arms {args.arms}: give chain, autotune or both, each once")
    import mlflow

    from pipeline import tracking

    budget = CHAIN_POINTS * args.epochs // 2
    rows, levelling = [], []
    with tempfile.TemporaryDirectory() as tmp:
        uri = tracking.new_local_store(Path(tmp))
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        env.pop("MLFLOW_RUN_ID", None)
        client = mlflow.MlflowClient(uri)
        if args.data == "colour":
            data = ["--dataset", "svhn", "--verify", "false", "--data_dir", str(colour_folder(Path(tmp) / "colour"))]
        else:
            data = ["--dataset", "synthetic", "--data_dir", f"{tmp}/data"]
        common = [*data, "--scale", "demo", "--val_split", "0.1", "--log_every", "1000"]
        execution = ["--executor", args.executor]

        def stage(name: str, seed: str, *extra: str) -> tuple[str, float]:
            cmd = [sys.executable, "-m", "pipeline", name, *common, "--seed", seed, *extra]
            print("$ " + " ".join(cmd[1:]), flush=True)
            start = time.monotonic()
            subprocess.run(cmd, cwd=PROJECT, env=env, check=True, stdout=subprocess.DEVNULL)
            runs = client.search_runs(["0"], f"tags.stage = '{name}'", order_by=["attributes.start_time DESC"])
            top = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)  # not one of its children
            return top.info.run_id, time.monotonic() - start

        def children(run_ids: list[str]) -> list:
            return [child for run_id in run_ids
                    for child in client.search_runs(["0"], f"tags.mlflow.parentRunId = '{run_id}'")]

        def best(run_ids: list[str]) -> tuple[float, float]:
            top = max((client.get_run(r) for r in run_ids), key=lambda r: r.data.metrics["best_val_acc"])
            return top.data.metrics["best_val_acc"], top.data.metrics["test_acc_at_best"]

        epochs = str(args.epochs)

        def run_chain(seed: str, parent: str) -> tuple[list[str], float]:
            lr_run, lr_s = stage("tune_lr", seed, "--parent_run_id", parent, "--epochs", epochs, *execution)
            gamma_run, gamma_s = stage("tune_gamma", seed, "--parent_run_id", lr_run, "--epochs", epochs, *execution)
            overfit_run, overfit_s = stage("overfit", seed, "--parent_run_id", gamma_run, "--epochs", epochs,
                                           *execution)
            chain = [lr_run, gamma_run, overfit_run]
            for child in children(chain):  # the gain of each chain child's last epoch over the one before
                history = sorted(client.get_metric_history(child.info.run_id, "val_acc"), key=lambda m: m.step)
                if len(history) >= 2:
                    levelling.append(history[-1].value - history[-2].value)
            return chain, lr_s + gamma_s + overfit_s

        def run_autotune(seed: str, parent: str) -> tuple[list[str], float]:
            tuned, tuned_s = stage("autotune", seed, "--parent_run_id", parent, "--trial_epochs",
                                   str(args.trial_epochs), "--epoch_budget", str(budget), "--n_trials", "100",
                                   "--pruner", "hyperband",
                                   "--prune_warmup_epochs", "1", "--startup_trials", "1",
                                   "--trials_from", args.trials_from, "--lr_schedule", args.lr_schedule,
                                   *execution)
            tags = client.get_run(tuned).data.tags
            print(f"seed {seed}: autotune's best lr={tags['best_lr']} gamma={tags['best_gamma']} "
                  f"wd={tags['best_wd']} bs={tags['best_bs']} (trial #{tags['best_trial_number']}; "
                  f"{tags['trials_complete']} complete, {tags['trials_pruned']} pruned)", flush=True)
            return [tuned], tuned_s

        for seed in args.seeds.split(","):
            parent, _ = stage("train", seed, "--epochs", args.parent_epochs, "--init", "scratch")
            runners = {"chain": run_chain, "autotune": run_autotune}
            for arm in args.arms.split(","):
                runs, seconds = runners[arm](seed, parent)
                val, test = best(runs)
                spent = sum(len(client.get_metric_history(c.info.run_id, "test_acc")) for c in children(runs))
                rows.append({"seed": seed, "arm": arm, "val": val, "test": test, "epochs": spent, "s": seconds})

    print(f"\ndata={args.data}, scale=demo, executor={args.executor}; parent: train {args.parent_epochs} epochs "
          f"from scratch; chain: {CHAIN_POINTS} points x {args.epochs} epochs; autotune: trials of up to "
          f"{args.trial_epochs} epochs, epoch_budget {budget} (half the chain's), trials_from {args.trials_from}, "
          f"lr_schedule {args.lr_schedule}")
    print("\n| seed | arm | best val acc (%) | test acc at that checkpoint (%) | epochs trained | wall time (s) |"
          "\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seed']} | {row['arm']} | {row['val']:.2f} | {row['test']:.2f} | {row['epochs']} | {row['s']:.0f} |")
    print("\n| arm | mean best val acc (%) | mean test acc at best (%) | mean epochs | mean wall time (s) |"
          "\n|---|---|---|---|---|")
    for arm in args.arms.split(","):
        mine = [r for r in rows if r["arm"] == arm]
        print(f"| {arm} | {statistics.fmean(r['val'] for r in mine):.2f} | "
              f"{statistics.fmean(r['test'] for r in mine):.2f} | {statistics.fmean(r['epochs'] for r in mine):.1f} | "
              f"{statistics.fmean(r['s'] for r in mine):.0f} |")
    for metric in ("val", "test") if {"chain", "autotune"} <= set(args.arms.split(",")) else ():
        by_seed = {(r["seed"], r["arm"]): r[metric] for r in rows}
        diffs = [by_seed[(s, "autotune")] - by_seed[(s, "chain")] for s in args.seeds.split(",")]
        mean, half = interval(diffs)
        print(f"\npaired difference in {metric} acc (autotune - chain): {mean:+.2f} points, 95% interval "
              f"[{mean - half:+.2f}, {mean + half:+.2f}] over {len(diffs)} seeds")
    if levelling:
        mean, half = interval(levelling)
        print(f"levelling: the chain's children gained {mean:+.2f} ± {half:.2f} val points in their last epoch "
              f"({len(levelling)} children)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
