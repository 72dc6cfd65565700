#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one short run on a CUDA machine (about 3-5 minutes
# on an H100/H200, the compile step at most 5 more). Results go to ${OUT:-gpu-results}/.
#
# Prepare here first: `bash benchmarks/gpu_wheels.sh` (MLflow and what it imports, as wheels in
# .whl/, for the full `train` epoch); then, with the device tool: carry [".whl"], command
# `bash benchmarks/gpu_check.sh`, timeout_s 600.
#
#   1. factors.*: both DataLoader baselines (seed-faithful; tuned), the factor table (pipeline
#      alone fp32 NCHW, + channels_last, + bf16) and the no-data-path ceiling, MyResNet, bs 256;
#   2. epoch.*: one full MyResNet `train` epoch over 73,257 synthetic training images (the set
#      tiled to SVHN's size) and 26,032 test images, through runner.train_in_run into a temporary
#      MLflow store, as logged, with its system/ GPU utilisation, against the ceiling;
#   3. compile.*: the same with torch.compile (allowed to fail or time out).
# A step that fails does not stop the next; the exit status is non-zero if any failed.
# A rehearsal on a CPU, tiny: GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=0.01 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
device=${GPU_CHECK_DEVICE:-cuda}
scale=${GPU_CHECK_SCALE:-1}
n() { python3 -c "print(max(2, round($1 * $scale)))"; }  # a count at this scale

{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc; uptime; } 2>&1 | tee "$out/machine.txt" || true

if ! python3 -c "import mlflow" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl 2>&1 | tail -3
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no mlflow and no .whl/: run benchmarks/gpu_wheels.sh here and carry .whl" | tee -a "$out/machine.txt"
    fi
fi
python3 -c "import torch, torchvision, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__)" \
    2>&1 | tee -a "$out/machine.txt"

run() {  # run NAME TIMEOUT_S ARGS...: one step, its output in $out/NAME.txt and .json
    local name=$1 limit=$2
    shift 2
    echo "== $name: throughput.py $*" | tee "$out/$name.txt"
    if ! timeout "$limit" python3 benchmarks/throughput.py --device "$device" --json "$out/$name.json" "$@" \
            2>&1 | tee -a "$out/$name.txt"; then
        echo "== $name FAILED (or ran past ${limit} s)" | tee -a "$out/$name.txt"
        status=1
    fi
}

batches=$(n 30) train_images=$(n 73257) test_images=$(n 26032)
run factors 240 --archs resnet --batches "$batches" --rounds 2 --epoch-images 0
run epoch 240 --archs resnet --rows ceiling --batches "$batches" --rounds 2 \
    --epoch-images "$train_images" --epoch-test-images "$test_images"
run compile 300 --archs resnet --rows "+ bf16,ceiling" --batches "$batches" --rounds 1 --compile \
    --epoch-images "$train_images" --epoch-test-images "$test_images"
exit $status
