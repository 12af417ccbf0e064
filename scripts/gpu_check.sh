#!/usr/bin/env bash
# Run every GPU-only test on a machine with a CUDA GPU and print one PASSED/FAILED line.
#
# These are the tests CI (no GPU) skips: running TensorRT / TensorRT-RTX engines, parity of
# engines against onnxruntime, the runner's profile choice and compatibility refusals, and the
# lily::HPMix plugin's CUDA implementation. Tests marked `trt` (engine builds) run too.
#   bash scripts/gpu_check.sh            # all of tests/
#   bash scripts/gpu_check.sh -k runner  # extra pytest arguments pass through
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: FAILED (no CUDA GPU visible to torch: run this on a GPU machine)"
    exit 1
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'sm%d%d' % torch.cuda.get_device_capability(), 'torch', torch.__version__)"
for mod in tensorrt tensorrt_rtx; do
    "$PY" -c "import $mod; print('gpu_check: $mod', $mod.__version__)" 2>/dev/null || echo "gpu_check: $mod not installed"
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$PY" -m pytest tests -m "gpu or trt" -p no:cacheprovider -q -rs "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
summary=$(grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected)" "$log" | tail -1 | sed -E 's/=+//g; s/^ +| +$//g')
if [ "$rc" -eq 0 ] && grep -q "passed" <<<"$summary"; then
    echo "gpu_check: PASSED ($summary)"
else
    echo "gpu_check: FAILED (${summary:-pytest exit status $rc})"
    exit 1
fi
