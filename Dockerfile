# arbor_titan images: CUDA by default, CPU with a Debian/Python base and the CPU torch wheel.
#
#   docker build -t arbor:cuda .
#   docker build -t arbor:cpu --build-arg BASE_IMAGE=debian:bookworm \
#       --build-arg ARBOR_TORCH_SPEC=torch==2.13.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker run --rm --gpus all --network host -v "$PWD/outputs:/arbor/outputs" arbor:cuda \
#       scripts/deploy.sh debug demo
#
# Wheels put in docker-wheels/ are preferred to downloads; with every dependency there (what
# scripts/docker_check.sh puts there) `--build-arg PIP_OPTIONS=--no-index` builds offline.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# A CUDA torch for the CUDA base (its own wheel index), or torch==2.13.0 with the CPU index.
ARG ARBOR_TORCH_SPEC="torch>=2.11"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PIP_OPTIONS=""

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /arbor
# Outside the checkout: scripts/env.sh then uses this environment as it is.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv

COPY docker-wheels/ /tmp/wheels/
RUN pip install ${PIP_OPTIONS} --find-links /tmp/wheels --extra-index-url "${TORCH_INDEX_URL}" \
    "${ARBOR_TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY arbor_titan/ arbor_titan/
COPY plugins/ plugins/
RUN pip install ${PIP_OPTIONS} --find-links /tmp/wheels -e ".[serve]" && rm -rf /tmp/wheels
COPY . .

# The server (scripts/serve.py) and TensorBoard; bind them with --host 0.0.0.0 to reach them
# from outside a container that isn't on the host network.
EXPOSE 8000 6006
CMD ["scripts/deploy.sh", "--help"]
