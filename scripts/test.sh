#!/usr/bin/env bash
# Run the whole test suite: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The dev extra is installed here, so a test of an optional package fails rather than skips
# when that package is missing (tests/conftest.py: dev_dependency).
export ARBOR_REQUIRE_DEV_DEPS=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/outputs/.inductor_cache}"
exec "${ARBOR_PYTHON}" -m pytest -q "$@"
