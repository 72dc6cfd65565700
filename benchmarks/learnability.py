"""Is the synthetic set learnable, and does our fast path keep the accuracy?

Trains MyResNet from scratch on 4,000 synthetic training images for 5 epochs at bs 64 (the
seed's other defaults: RMSprop lr 1e-3, augmentation on) through the real `train` entry point
code, once on our pipeline (batched tensors, bf16 where native) and once on the seed's
(torchvision DataLoader, fp32), into a temporary tracking store, and prints best_test_acc.
Target: at least 80% within 5 epochs, and the two pipelines within noise of each other.

    python benchmarks/learnability.py [--epochs 5] [--limit-train 4000] [--pipelines tensor,torchvision] [--seeds 1412,1413]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
VARIANTS = {"tensor": ["--data_pipeline", "tensor", "--precision", "auto"],
            "tensor-fp32": ["--data_pipeline", "tensor", "--precision", "fp32"],
            "torchvision": ["--data_pipeline", "torchvision", "--precision", "fp32"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--epochs", default="5")
    parser.add_argument("--limit-train", default="4000")
    parser.add_argument("--limit-test", default="2000")
    parser.add_argument("--pipelines", default="tensor,torchvision")
    parser.add_argument("--seeds", default="1412", help="comma-separated: accuracy at a few seeds shows the noise")
    args = parser.parse_args()
    import mlflow

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
        env.pop("MLFLOW_RUN_ID", None)
        for seed, name in [(s, p) for s in args.seeds.split(",") for p in args.pipelines.split(",")]:
            cmd = [sys.executable, "-m", "pipeline", "train", "--dataset", "synthetic", "--arch", "resnet",
                   "--seed", seed,
                   "--limit_train", args.limit_train, "--limit_test", args.limit_test,
                   "--epochs", args.epochs, "--bs", "64", "--log_every", "1000", *VARIANTS[name]]
            print("$ " + " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=PROJECT, env=env, check=True)
            client = mlflow.MlflowClient(uri)
            run = client.search_runs(["0"], order_by=["attributes.start_time DESC"], max_results=1)[0]
            accs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "test_acc"),
                                            key=lambda m: m.step)]
            ips = [m.value for m in client.get_metric_history(run.info.run_id, "train_images_per_s")]
            rows.append((seed, name, run.data.metrics["best_test_acc"], accs, max(ips)))
    print("\n| seed | pipeline | best test acc (%) | test acc per epoch | train img/s |\n|---|---|---|---|---|")
    for seed, name, best, accs, ips in rows:
        print(f"| {seed} | {name} | {best:.2f} | {', '.join(f'{a:.1f}' for a in accs)} | {ips:.0f} |")
    for name in args.pipelines.split(","):
        bests = [best for _, n, best, _, _ in rows if n == name]
        print(f"{name}: mean best test acc {sum(bests) / len(bests):.2f}% over {len(bests)} seeds")
    return 0 if all(best >= 80 for _, _, best, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
