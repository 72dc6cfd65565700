"""What one `python -m pipeline` process costs around its training: a `train` run of one epoch on
300 synthetic images at the demo scale, run N times in a fresh temporary store, each time a new
process (as every stage of `main` and every end-to-end test is). Reports wall and user CPU seconds
per run, and the seconds between the process's last line and its exit (the interpreter's own
teardown). Run it at two commits to compare them; nothing else should run beside it.

    python benchmarks/process_overhead.py [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from pipeline import tracking

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.new_local_store(Path(tmp)))
        cmd = [sys.executable, "-m", "pipeline", "train", "--scale", "demo", "--dataset", "synthetic",
               "--data_dir", f"{tmp}/data", "--epochs", "1", "--init", "scratch", "--val_split", "0.1",
               "--log_every", "1000", "--limit_train", "300"]
        subprocess.run(cmd, cwd=PROJECT, env=env, check=True, capture_output=True)  # makes the data once
        for _ in range(args.runs):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            last_line = start
            for _line in proc.stdout:
                last_line = time.monotonic()
            assert proc.wait() == 0
            end = time.monotonic()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            rows.append((end - start, after.ru_utime - before.ru_utime, end - last_line))
    print("| run | wall s | user CPU s | last line to exit s |\n|---|---|---|---|")
    for i, (wall, user, tail) in enumerate(rows, 1):
        print(f"| {i} | {wall:.2f} | {user:.2f} | {tail:.2f} |")
    print(f"| mean | {statistics.fmean(r[0] for r in rows):.2f} | {statistics.fmean(r[1] for r in rows):.2f} | "
          f"{statistics.fmean(r[2] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
