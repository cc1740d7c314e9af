#!/usr/bin/env bash
# Wheels for the offline GPU machine: scripts/gpu_wheels.sh [FOLDER]   (default: .whl, ignored)
#
# That machine's python3 (CPython 3.12, x86-64) already holds torch, transformers, pyarrow,
# tensorboard, sentencepiece, safetensors, tokenizers, httpx, anyio, click, h11, idna, numpy and
# prometheus-client, but not what float8 (torchao), the server (FastAPI, uvicorn) and the config
# writer (tomli-w) need. This downloads, here, exactly those wheels and the dependencies of theirs
# the machine lacks, for cp312 manylinux x86-64; scripts/gpu_check.sh installs them there with
# `pip install --no-index` into a temporary folder. torchdata is not carried: nothing imports it.
#
# Versions are the ones the tests run with here; typing-extensions travels too because pydantic
# needs >= 4.16, newer than the machine's may be. The folder travels with the checkout (64 MiB
# for everything), so this fails when it grows past 40 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

FOLDER="${1:-.whl}"
MAX_MIB=40
WHEELS=(
    torchao==0.18.0
    fastapi==0.165.0
    starlette==1.10.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    opentelemetry-api==1.45.2
    uvicorn==0.54.0
    tomli-w==1.2.0
)
# pip matches each manylinux tag exactly: torchao is built for 2_28, pydantic-core for 2_17.
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "${tag}")
done

PYTHON="${ARBOR_PYTHON:-python3}"
rm -rf "${FOLDER}"
mkdir -p "${FOLDER}"
"${PYTHON}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" --dest "${FOLDER}" "${WHEELS[@]}"

size_kib="$(du -sk "${FOLDER}" | cut -f1)"
echo "gpu_wheels: $(ls "${FOLDER}" | wc -l) wheels, $((size_kib / 1024)) MiB in ${FOLDER}:"
ls -1 "${FOLDER}"
if [ "${size_kib}" -gt $((MAX_MIB * 1024)) ]; then
    echo "gpu_wheels: ${FOLDER} is over ${MAX_MIB} MiB; the checkout travels in 64 MiB" >&2
    exit 1
fi
