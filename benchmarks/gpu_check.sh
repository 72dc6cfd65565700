#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one short run on a CUDA machine: at most 8.5 minutes
# (the sum of the steps' time limits below, 490 s, plus start-up; about 4-5 expected on an
# H100/H200). Results go to ${OUT:-gpu-results}/: log.txt (the machine, what every step printed,
# a summary) and NAME.json for each throughput step (the device tool brings back 8 files).
#
# Prepare here first: `bash benchmarks/gpu_wheels.sh` (MLflow and what it imports, as wheels in
# .whl/, for the full `train` epoch); then, with the device tool: carry [".whl"], command
# `bash benchmarks/gpu_check.sh`, timeout_s 600.
#
#   0. syncs: tests/test_cuda.py, host syncs counted (torch's sync debug mode) in an epoch of
#      train.fit with 5 and with 10 batches: equal, so none per batch;
#   1. factors: both DataLoader baselines (seed-faithful; tuned), the factor table (pipeline
#      alone fp32 NCHW, + channels_last, + bf16) and the no-data-path ceiling, MyResNet, bs 256;
#   2. epoch-levers-off: one full MyResNet `train` epoch over 73,257 synthetic training images
#      (the set tiled to SVHN's size) and 26,032 test images, through runner.train_in_run into
#      a temporary MLflow store, as logged, with its system/ GPU utilisation, against the
#      ceiling; evaluation at the training batch size (eval_bs=256), not compiled;
#   3. epoch: the same with the defaults: eval_bs automatic (1024 on CUDA);
#   4. checkpoints: what an epoch's record (best.pt, last.pt, metrics) costs written in the
#      training thread against the copy and hand-off to the background writer (always on in a
#      run: no switch to turn it off), MyResNet and MyVgg, the write overlapping one epoch's
#      batches (287 at bs 256), as in a run;
#   5. compile-MODE for each MODE in $GPU_CHECK_COMPILE (default max-autotune: Inductor's
#      autotuned kernels and CUDA graphs): step 3 with -P compile=MODE, ceiling compiled alike.
#      Its first epoch includes compiling; epoch 2 is the steady one. One round of the ceiling:
#      compiling every shape (train and eval, full and short last batches) may take most of
#      its limit (not yet measured on a GPU).
# The levers always on: no host sync per step (augment's draws go to the GPU non-blocking) and
# the background checkpoint writer. A step that fails or runs past its limit does not stop the
# next; the exit status is non-zero if any failed.
# A rehearsal on a CPU, tiny, with 5x the time limits:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=0.01 GPU_CHECK_SLACK=5 GPU_CHECK_BS=32 bash benchmarks/gpu_check.sh
# (bs 32: a DataLoader row times at least 4 prefetch queues of batches, too many at 256 on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
device=${GPU_CHECK_DEVICE:-cuda}
scale=${GPU_CHECK_SCALE:-1}
slack=${GPU_CHECK_SLACK:-1}  # the rehearsal's time limits: a loaded 2-core CPU is far slower
n() { python3 -c "print(max(2, round($1 * $scale)))"; }  # a count at this scale

log=$out/log.txt
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc; uptime; } 2>&1 | tee "$log" || true

if ! python3 -c "import mlflow" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl 2>&1 | tail -3 \
            || echo "installing .whl/ failed: every step but syncs and factors will fail" | tee -a "$log"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no mlflow and no .whl/: run benchmarks/gpu_wheels.sh here and carry .whl" | tee -a "$log"
    fi
fi
python3 -c "import torch, torchvision, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__)" \
    2>&1 | tee -a "$log"

summary=()
step() {  # step NAME TIMEOUT_S SCRIPT ARGS...: one step, its output appended to $log
    local name=$1 limit=$(($2 * slack)) script=$3 started=$SECONDS
    shift 3
    echo "== $name: $script $*" | tee -a "$log"
    if timeout "$limit" python3 "benchmarks/$script" --device "$device" "$@" 2>&1 | tee -a "$log"; then
        summary+=("$name: ok, $((SECONDS - started)) s")
    else
        echo "== $name FAILED (or ran past ${limit} s)" | tee -a "$log"
        summary+=("$name: FAILED after $((SECONDS - started)) s (limit $limit s)")
        status=1
    fi
}

batches=$(n 30) train_images=$(n 73257) test_images=$(n 26032) bs=${GPU_CHECK_BS:-256}
epoch=(--archs resnet --rows ceiling --batches "$batches" --rounds 2 --bs "$bs"
       --epoch-images "$train_images" --epoch-test-images "$test_images")
echo "== syncs: pytest tests/test_cuda.py" | tee -a "$log"
started=$SECONDS
if [ "$device" != cuda ]; then
    summary+=("syncs: skipped (device $device)")
elif SVHN_REQUIRE_CUDA=1 timeout $((40 * slack)) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        2>&1 | tee -a "$log"; then
    summary+=("syncs: ok, $((SECONDS - started)) s")
else
    echo "== syncs FAILED (or ran past $((40 * slack)) s)" | tee -a "$log"
    summary+=("syncs: FAILED after $((SECONDS - started)) s (a host sync per batch, or see the log)")
    status=1
fi
step factors 90 throughput.py --archs resnet --batches "$batches" --rounds 2 --bs "$bs" --epoch-images 0 \
    --json "$out/factors.json"
step epoch-levers-off 70 throughput.py "${epoch[@]}" --eval-bs "$bs" --json "$out/epoch-levers-off.json"
step epoch 70 throughput.py "${epoch[@]}" --json "$out/epoch.json"
step checkpoints 60 checkpoint_overhead.py --archs resnet,vgg --bs "$bs" --batches "$batches" --overlap-batches "$(n 287)" \
    --rounds 3
for mode in ${GPU_CHECK_COMPILE:-max-autotune}; do
    step "compile-$mode" 160 throughput.py "${epoch[@]}" --rounds 1 --compile "$mode" --json "$out/compile-$mode.json"
done
printf '\n== summary\n' | tee -a "$log"
printf '%s\n' "${summary[@]}" | tee -a "$log"
exit $status
