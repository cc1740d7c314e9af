#!/usr/bin/env bash
# Run the whole test suite: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/outputs/.inductor_cache}"
exec "${ARBOR_PYTHON}" -m pytest -q "$@"
