#!/usr/bin/env bash
# Train from a TOML config: ./run_train.sh [CONFIG.toml] [--section.key=value ...]
#
# Environment: NGPU (processes per node, default 1), NNODES (default 1), NODE_RANK,
# RDZV_ENDPOINT (host:port of node 0, for several nodes), LOG_RANK (the global rank whose progress is shown,
# default 0), DRY_RUN=1 (plan the config without training; see arbor_titan.estimate),
# MAX_RESTARTS (default 0: times torchrun restarts every process after one fails, e.g. killed or
# stopped by training.hang_timeout_s; each restart resumes from the newest complete checkpoint).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh

CONFIG="train_configs/debug_model.toml"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
    CONFIG="$1"
    shift
fi

if [ "${DRY_RUN:-0}" = "1" ]; then
    # Plan the config on this CPU instead of training; NGPU/NNODES, when set, give the world.
    world=()
    if [ -n "${NGPU:-}${NNODES:-}" ]; then
        world=(--world-size="$(( ${NGPU:-1} * ${NNODES:-1} ))")
    fi
    exec "${ARBOR_PYTHON}" -m arbor_titan.estimate "${CONFIG}" ${world[@]+"${world[@]}"} "$@"
fi

NGPU="${NGPU:-1}"
NNODES="${NNODES:-1}"
export LOG_RANK="${LOG_RANK:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
if ! [[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]]; then
    echo "error: MAX_RESTARTS must be a whole number >= 0, got '${MAX_RESTARTS}'" >&2
    exit 2
fi

if [ "${NNODES}" -gt 1 ]; then
    : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0 when NNODES > 1}"
    rendezvous=(--nnodes="${NNODES}" --node_rank="${NODE_RANK:-0}" --rdzv_backend=c10d
                --rdzv_endpoint="${RDZV_ENDPOINT}")
else
    rendezvous=(--standalone --nnodes=1)
fi

# torchrun, ending with the training's own one-line error when a rank stops on a user mistake.
exec "${ARBOR_PYTHON}" -m arbor_titan.launch "${rendezvous[@]}" \
    --nproc_per_node="${NGPU}" --max-restarts="${MAX_RESTARTS}" -m arbor_titan.train "${CONFIG}" "$@"
