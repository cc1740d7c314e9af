# Sourced by run_train.sh and scripts/test.sh: find or make a Python environment with arbor_titan.
#
# An already active environment that imports arbor_titan and torch is used as it is. Otherwise
# .venv is created (or refreshed when pyproject.toml changed) with torch installed first as
# ARBOR_TORCH_SPEC (default torch==2.13.0, a CPU wheel; users with GPUs set e.g.
# ARBOR_TORCH_SPEC="torch>=2.13") so the project's own range never pulls a CUDA build here.
# Sets ARBOR_PYTHON.

_arbor_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_arbor_venv="${_arbor_root}/.venv"
_arbor_stamp="${_arbor_venv}/.arbor_installed"
_arbor_want="$(cat "${_arbor_root}/pyproject.toml" | sha1sum | cut -c1-16) ${ARBOR_TORCH_SPEC:-torch==2.13.0}"

if [ -n "${VIRTUAL_ENV:-}" ] && [ "${VIRTUAL_ENV}" != "${_arbor_venv}" ] \
    && python -c "import torch, arbor_titan" >/dev/null 2>&1; then
    ARBOR_PYTHON="$(command -v python)"
else
    if [ ! -x "${_arbor_venv}/bin/python" ] || [ "$(cat "${_arbor_stamp}" 2>/dev/null)" != "${_arbor_want}" ]; then
        echo "[setup] preparing ${_arbor_venv} (first run only; torch: ${ARBOR_TORCH_SPEC:-torch==2.13.0})" >&2
        python3 -m venv "${_arbor_venv}" || return 1 2>/dev/null || exit 1
        _arbor_log="${_arbor_venv}/setup.log"
        { "${_arbor_venv}/bin/python" -m pip install --upgrade pip \
            && "${_arbor_venv}/bin/python" -m pip install "${ARBOR_TORCH_SPEC:-torch==2.13.0}" \
            && "${_arbor_venv}/bin/python" -m pip install -e "${_arbor_root}[dev]"; } \
            > "${_arbor_log}" 2>&1 \
            || { tail -n 30 "${_arbor_log}" >&2
                 echo "[setup] installing the environment failed; full log: ${_arbor_log}" >&2
                 return 1 2>/dev/null || exit 1; }
        echo "${_arbor_want}" > "${_arbor_stamp}"
        echo "[setup] environment ready" >&2
    fi
    ARBOR_PYTHON="${_arbor_venv}/bin/python"
fi
export ARBOR_PYTHON
