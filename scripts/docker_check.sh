#!/usr/bin/env bash
# Build the CPU image on a locally made Debian base and run `scripts/deploy.sh debug demo` in it.
#
#   scripts/docker_check.sh        (needs root for dockerd and debootstrap; several minutes)
#
# Made for machines without an image registry: the base image comes from `debootstrap` (Debian's
# own packages) and `docker import`; this machine's pip puts every wheel the image needs (its
# CPU torch included) into docker-wheels/, and the build installs from there with --no-index. Where no docker daemon can
# start, it says so and exits 0 with "skipped". The daemon it starts (no bridge, no iptables:
# containers use --network host, so every address stays on 127.0.0.1) is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

BASE=arbor-base:bookworm
IMAGE=arbor:cpu
PORT="${PORT:-8765}"

skip() {
    echo "docker_check: skipped: $*"
    exit 0
}

started_daemon=""
cleanup() {
    if [ -n "${started_daemon}" ]; then
        kill "${started_daemon}" 2>/dev/null || true
    fi
}
trap cleanup EXIT

command -v docker >/dev/null || skip "no docker client (apt-get install docker.io)"
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || skip "no docker daemon and no dockerd to start"
    echo "== starting dockerd --bridge=none --iptables=false"
    dockerd --bridge=none --iptables=false >/tmp/arbor-dockerd.log 2>&1 &
    started_daemon=$!
    for _ in $(seq 30); do
        docker info >/dev/null 2>&1 && break
        kill -0 "${started_daemon}" 2>/dev/null || break
        sleep 1
    done
    docker info >/dev/null 2>&1 \
        || skip "dockerd cannot start here: $(tail -n 1 /tmp/arbor-dockerd.log)"
fi

if ! docker image inspect "${BASE}" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || skip "no ${BASE} image and no debootstrap to make one"
    rootfs="$(mktemp -d)"
    echo "== debootstrap bookworm into ${rootfs}"
    debootstrap --variant=minbase bookworm "${rootfs}" http://deb.debian.org/debian >/dev/null
    tar -C "${rootfs}" -c . | docker import - "${BASE}"
    rm -rf "${rootfs}"
fi

torch_version="$("${ARBOR_PYTHON}" -c 'import torch; print(torch.__version__)')"
echo "== torch ${torch_version} and every other wheel of the image into docker-wheels/"
"${ARBOR_PYTHON}" -m pip download --dest docker-wheels "torch==${torch_version}" ".[serve]" \
    "setuptools>=77" >/dev/null

echo "== docker build ${IMAGE}"
docker build --network host -t "${IMAGE}" \
    --build-arg BASE_IMAGE="${BASE}" \
    --build-arg ARBOR_TORCH_SPEC="torch==${torch_version}" \
    --build-arg PIP_OPTIONS=--no-index .

echo "== scripts/deploy.sh debug demo in ${IMAGE}"
start=$(date +%s)
docker run --rm --network host -e PORT="${PORT}" "${IMAGE}" scripts/deploy.sh debug demo
echo "docker_check: passed (demo in the container: $(( $(date +%s) - start )) s)"
