#!/usr/bin/env bash
# The whole study (`main`) at the seed's full size on one GPU, children as Ray tasks packed four
# to the GPU, with its wall time and the GPU's utilisation (nvidia-smi every 2 s, and MLflow's
# system/ metrics in every run). Goal: at most 10 minutes on one H100-class GPU (about 2.4 hours
# at the seed's pace). Results go to ${OUT:-gpu-results}/study.*.
#
# Needs on the GPU machine: torch, torchvision, MLflow and Ray 2.60.0 (ray's wheel alone is 79 MB,
# more than the device tool carries, so it must be installed there) and the project's pins.
# Synthetic SVHN-format data at SVHN's sizes (73,257 train, 26,032 test images) is generated first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export MLFLOW_TRACKING_URI="sqlite:///$PWD/$out/study.db"
if ! python3 -c "import ray, mlflow" 2>/dev/null; then
    echo "no ray or mlflow on this machine: install requirements.lock first" | tee "$out/study.txt"
    exit 1
fi
# each step below may fail on its own: the summary lines at the end always print
{ date -u; nvidia-smi -L || true
  python3 -c "import torch, ray, mlflow; print('torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)" || true; } \
    2>&1 | tee "$out/study.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 2 > "$out/study.nvidia-smi.csv" &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
start=$(date +%s)
set +e  # the study's own status, not tee's, and the summary even when it fails
timeout "${STUDY_TIMEOUT_S:-1500}" mlflow run . -e main --env-manager local \
    -P dataset=synthetic -P synthetic_train=73257 -P synthetic_test=26032 \
    -P executor=ray -P gpus_per_trial=0.25 -P cpus_per_trial=2 -P checkpoint_every=5 \
    2>&1 | tee -a "$out/study.txt"
status=${PIPESTATUS[0]}
set -e
end=$(date +%s)
case $status in
    0) outcome="finished" ;;
    124) outcome="TIMED OUT after ${STUDY_TIMEOUT_S:-1500} s" ;;
    *) outcome="FAILED (exit $status)" ;;
esac
echo "whole study: $outcome, $((end - start)) s wall (goal: at most 600 s)" | tee -a "$out/study.txt"
python3 - "$out/study.nvidia-smi.csv" <<'EOF' 2>&1 | tee -a "$out/study.txt" || true
import sys
util = [float(line.split(",")[1].split()[0]) for line in open(sys.argv[1]) if "%" in line]
if util:
    busy = sum(u > 0 for u in util) / len(util)
    print(f"GPU utilisation over {len(util)} samples: mean {sum(util) / len(util):.0f}%, busy {busy:.0%} of the time")
EOF
exit "$status"
