#!/usr/bin/env bash
# GPU check, offline: scripts/gpu_check.sh [--out DIR] [--only STEP,...] [--budget-s S] [--plumbing]
#
# Runs on the machine's own Python (GPU_CHECK_PYTHON, default python3) when it imports torch:
# no virtual environment, nothing fetched. The wheels that Python lacks travel in .whl (made
# here by scripts/gpu_wheels.sh) and are installed with pip --no-index into a temporary folder.
# The steps, their timeouts and the summary are scripts/gpu_check.py's; the whole check stops
# after GPU_CHECK_TIMEOUT_S (default 540) whatever happens. --plumbing runs it on CPU at toy
# sizes (what tests/scripts/test_gpu_check.py does).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${GPU_CHECK_PYTHON:-python3}"
if ! "${PYTHON}" -c "import torch" 2>/dev/null; then
    echo "gpu_check: ${PYTHON} cannot import torch; set GPU_CHECK_PYTHON to a Python that has it" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
exec timeout -k 30 "${GPU_CHECK_TIMEOUT_S:-540}" "${PYTHON}" scripts/gpu_check.py "$@"
