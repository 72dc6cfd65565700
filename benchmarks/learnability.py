"""Does our fast path learn as well as the seed's? Paired seeds at a point where accuracy has levelled off.

Trains MyResNet from scratch on the synthetic set (or, with --data-dir, on any SVHN-format .mat
files, such as the real handwritten digits benchmarks/real_digits.py writes) through the real `train` entry point code
(`python -m pipeline train`, into a temporary tracking store), once per seed on each path:

    default            no pipeline or precision given: tensor pipeline, precision=auto
                       (bf16 where the hardware computes it natively)
    tensor-fp32        data_pipeline=tensor precision=fp32
    torchvision-fp32   data_pipeline=torchvision precision=fp32 (seed-faithful: the seed's
                       torchvision DataLoader and per-sample PIL transforms)

Every path of one seed gets the same seed (same initial weights, same synthetic images). It
prints each run's best test accuracy and per-epoch curve, then per path the mean best accuracy
with its sd, the mean curve per epoch (to show where it levels off), and the mean paired
difference against torchvision-fp32 with a 95% t-interval.

    python benchmarks/learnability.py --seeds 1412,1413,1414,1415,1416,1417,1418,1419 \\
        --epochs 12 --limit-train 3000 --limit-test 1000 --json learnability.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
PATHS = {"default": [],
         "tensor-fp32": ["--data_pipeline", "tensor", "--precision", "fp32"],
         "torchvision-fp32": ["--data_pipeline", "torchvision", "--precision", "fp32"]}
REFERENCE = "torchvision-fp32"
# two-sided 95% quantiles of Student's t (scipy is not needed for a benchmark script)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The table's value at df, or at the next smaller df listed (a slightly wider interval)."""
    return T975[max(d for d in T975 if d <= df)]


def mean_ci(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sd, low, high): the 95% t-interval of the mean."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = statistics.stdev(values)
    half = t975(len(values) - 1) * sd / math.sqrt(len(values))
    return mean, sd, mean - half, mean + half


def train_once(uri: str, seed: str, path: str, args) -> dict:
    import mlflow

    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    env.pop("MLFLOW_RUN_ID", None)
    data = ["--dataset", "svhn", "--data_dir", args.data_dir, "--verify", "false"] if args.data_dir \
        else ["--dataset", "synthetic"]
    cmd = [sys.executable, "-m", "pipeline", "train", *data, "--arch", "resnet",
           "--seed", seed, "--limit_train", args.limit_train, "--limit_test", args.limit_test,
           "--epochs", args.epochs, "--bs", args.bs, "--log_every", "100000", *PATHS[path]]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=PROJECT, env=env, check=True)
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(uri)
    run = client.search_runs(["0"], order_by=["attributes.start_time DESC"], max_results=1)[0]

    def curve(name):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
                if m.step > 0]

    return {"seed": seed, "path": path, "best": run.data.metrics["best_test_acc"],
            "precision": run.data.params["precision_resolved"],
            "curve": curve("test_acc"), "train_img_s": statistics.median(curve("train_images_per_s")),
            "wall_s": wall}


def paired_table(value: dict, seeds: list[str], paths: list[str], label: str) -> None:
    """Per path: the mean of value[seed, path] with its sd, and the mean paired difference
    against REFERENCE with its 95% t-interval."""
    print(f"| path | {label} | sd | mean paired diff vs {REFERENCE} (points) | 95% t-interval |")
    print("|---|---|---|---|---|")
    for p in paths:
        mean, sd, _, _ = mean_ci([value[s, p] for s in seeds])
        if p == REFERENCE or REFERENCE not in paths:
            print(f"| {p} | {mean:.2f} | {sd:.2f} | | |")
            continue
        d_mean, d_sd, low, high = mean_ci([value[s, p] - value[s, REFERENCE] for s in seeds])
        print(f"| {p} | {mean:.2f} | {sd:.2f} | {d_mean:+.2f} (sd {d_sd:.2f}) | [{low:+.2f}, {high:+.2f}] |")


def report(rows: list[dict], paths: list[str]) -> None:
    print("\n| seed | path | best test acc (%) | test acc per epoch | train img/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['path']} | {r['best']:.2f} | {', '.join(f'{a:.1f}' for a in r['curve'])} | "
              f"{r['train_img_s']:.0f} |")
    seeds = [s for s in dict.fromkeys(r["seed"] for r in rows)
             if all(any(r["seed"] == s and r["path"] == p for r in rows) for p in paths)]
    best = {(r["seed"], r["path"]): r["best"] for r in rows}
    print(f"\nbest test accuracy (%) per seed, and each path minus {REFERENCE}:\n")
    others = [p for p in paths if p != REFERENCE and REFERENCE in paths]
    print("| seed | " + " | ".join(paths) + "".join(f" | {p} - ref" for p in others) + " |")
    print("|---" * (1 + len(paths) + len(others)) + "|")
    for s in seeds:
        print(f"| {s} | " + " | ".join(f"{best[s, p]:.1f}" for p in paths)
              + "".join(f" | {best[s, p] - best[s, REFERENCE]:+.1f}" for p in others) + " |")
    print(f"\nover {len(seeds)} paired seeds ({', '.join(seeds)}):\n")
    paired_table(best, seeds, paths, "mean best acc (%)")
    # the best epoch is a maximum over noisy epochs; the mean of the last ones is the level itself
    tail = 5
    level = {(r["seed"], r["path"]): statistics.fmean(r["curve"][-tail:]) for r in rows}
    print(f"\nthe same over the mean test accuracy of each run's last {tail} epochs (the level, not a maximum):\n")
    paired_table(level, seeds, paths, "mean level (%)")
    # the mean curve shows whether accuracy has levelled off by the last epoch
    print("\n| path | mean test acc per epoch (%) | mean best-so-far per epoch (%) |\n|---|---|---|")
    for p in paths:
        curves = [r["curve"] for r in rows if r["path"] == p and r["seed"] in seeds]
        if not curves:
            continue
        n = min(len(c) for c in curves)  # early stopping may end a run sooner
        mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        best_so_far = [statistics.fmean(max(c[:i + 1]) for c in curves) for i in range(n)]
        print(f"| {p} | {', '.join(f'{a:.1f}' for a in mean_curve)} | {', '.join(f'{a:.1f}' for a in best_so_far)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--epochs", default="12")
    parser.add_argument("--limit-train", default="3000")
    parser.add_argument("--limit-test", default="1000")
    parser.add_argument("--bs", default="64")
    parser.add_argument("--data-dir", default="", help="SVHN-format .mat files to learn instead of the synthetic "
                        "set (e.g. real digits from benchmarks/real_digits.py; 0 limits = all)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--seeds", default="1412,1413,1414,1415,1416,1417,1418,1419")
    parser.add_argument("--json", default="", help="write every run's result here (after each run)")
    parser.add_argument("--report", default="", help="only print the tables of such a JSON file (a study so far)")
    args = parser.parse_args()
    paths = args.paths.split(",")
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report(saved["rows"], saved["args"]["paths"].split(","))
        return 0
    rows = []
    from pipeline import tracking

    with tempfile.TemporaryDirectory() as tmp:
        uri = tracking.new_local_store(Path(tmp))
        for seed in args.seeds.split(","):
            for path in paths:
                rows.append(train_once(uri, seed, path, args))
                r = rows[-1]
                print(f"[{seed} {path}: best {r['best']:.2f}% ({r['precision']}), {r['wall_s']:.0f} s]", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    report(rows, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
