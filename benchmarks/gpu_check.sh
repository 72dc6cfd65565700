#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in one short run on a CUDA machine (uses its python3,
# which needs torch, torchvision, scipy, pyyaml and pillow). Output goes to ${OUT:-.}.
set -uo pipefail
out=${OUT:-.}
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, torchvision, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__)"
python3 benchmarks/throughput.py --device cuda --batches 30 --rounds 2 --epoch-images 73257 \
    --json "$out/gpu.json" 2>&1 | tee "$out/gpu.txt"
python3 benchmarks/throughput.py --device cuda --archs resnet --batches 30 --rounds 1 --epoch-images 73257 \
    --compile --json "$out/gpu_compile.json" 2>&1 | tee "$out/gpu_compile.txt"
