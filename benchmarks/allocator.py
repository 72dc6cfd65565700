"""One training step's time (forward, backward, RMSprop; bf16 autocast on CPU) with glibc's
default mmap/trim thresholds and with runtime.tune_allocator()'s, each in a fresh process
(mallopt is per process and must come before the buffers it should govern).

    python benchmarks/allocator.py [--archs vgg,resnet] [--bs 32] [--steps 30]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

STEP = """
import sys, time
import torch
from pipeline import models, runtime
if sys.argv[1] == "tuned":
    print(runtime.tune_allocator(), file=sys.stderr)
torch.manual_seed(0)
model = models.build(sys.argv[2])
optimiser = torch.optim.RMSprop(model.parameters(), lr=1e-4)
x, y = torch.randn(int(sys.argv[3]), 3, 32, 32), torch.randint(0, 10, (int(sys.argv[3]),))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(int(sys.argv[4])):
    step()
print((time.perf_counter() - start) / int(sys.argv[4]) * 1000)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archs", default="vgg,resnet")
    parser.add_argument("--bs", default="32")
    parser.add_argument("--steps", default="30")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    print("| arch | bs | glibc defaults (ms a step) | tune_allocator (ms a step) |\n|---|---|---|---|")
    for arch in args.archs.split(","):
        times = [float(subprocess.run([sys.executable, "-c", STEP, mode, arch, args.bs, args.steps], cwd=PROJECT,
                                      env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
                 for mode in ("default", "tuned")]
        print(f"| {arch} | {args.bs} | {times[0]:.1f} | {times[1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
