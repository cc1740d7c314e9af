#!/usr/bin/env bash
# One command per stage of a model's life, thin over run_train.sh and scripts/.
usage() {
    cat <<'EOF'
usage: scripts/deploy.sh SIZE ACTION [ARGS...]

SIZE     the config it uses
  debug  train_configs/debug_model.toml  (any CPU)
  bench  train_configs/bench.toml        (any CPU)
  799m   train_configs/arbor_799m.toml   (one GPU, or a CPU slowly)
  200b   train_configs/arbor_200b.toml   (256 GPUs: 32 nodes × 8)
  400b   train_configs/arbor_400b.toml   (512 GPUs: 64 nodes × 8)

ACTION
  plan            the dry run: per-rank shards, memory and step time (DRY_RUN=1 ./run_train.sh)
  create          a seed checkpoint (step-0), written sharded by the processes that will train
  train [NODES]   ./run_train.sh with the size's config on NODES nodes (default 1); with more
                  than one, run it on every node with NODE_RANK=<n> RDZV_ENDPOINT=<node0>:29500
  serve           scripts/serve.py on the newest checkpoint (tensor parallel over NGPU
                  processes under torchrun when NGPU > 1); PORT (default 8000)
  benchmark       training throughput (a few steps of the size's config) and inference speed
  demo            debug size only: train → generate → serve → one request → stop

Environment: NGPU (processes per node; default 1), PORT, STEPS (train/demo steps),
MAX_RESTARTS (see run_train.sh). Outputs go to outputs/deploy_<SIZE>/. Extra ARGS reach the
training (--section.key=value) or serve.py.
EOF
}
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "error: $*" >&2
    exit 2
}

case "${1:-}" in
    -h | --help | help) usage; exit 0 ;;
    "") die "missing SIZE and ACTION (see scripts/deploy.sh --help)" ;;
esac
SIZE="$1"
ACTION="${2:-}"
shift
[ $# -gt 0 ] && shift
case "${SIZE}" in
    debug) CONFIG=train_configs/debug_model.toml ;;
    bench) CONFIG=train_configs/bench.toml ;;
    799m) CONFIG=train_configs/arbor_799m.toml ;;
    200b) CONFIG=train_configs/arbor_200b.toml ;;
    400b) CONFIG=train_configs/arbor_400b.toml ;;
    *) die "unknown size '${SIZE}'; sizes: debug, bench, 799m, 200b, 400b" ;;
esac
case "${ACTION}" in
    plan | create | train | serve | benchmark | demo) ;;
    "") die "missing ACTION; actions: plan, create, train, serve, benchmark, demo" ;;
    *) die "unknown action '${ACTION}'; actions: plan, create, train, serve, benchmark, demo" ;;
esac
JOB="deploy_${SIZE}"
RUN=(--job.name="${JOB}" --job.dump_folder=./outputs)
CHECKPOINTS="outputs/${JOB}/checkpoints"
PORT="${PORT:-8000}"

source scripts/env.sh

newest_checkpoint() {
    local newest
    newest="$(ls -d "${CHECKPOINTS}"/step-* 2>/dev/null | sort -t- -k2 -n | tail -n 1)"
    [ -n "${newest}" ] || die "no checkpoint in ${CHECKPOINTS}; run: scripts/deploy.sh ${SIZE} train"
    echo "${newest}"
}

# Python under torchrun when NGPU > 1 (tensor parallel serving and generation).
run_python() {
    if [ "${NGPU:-1}" -gt 1 ]; then
        "${ARBOR_PYTHON}" -m torch.distributed.run --standalone --nproc_per_node="${NGPU}" "$@"
    else
        "${ARBOR_PYTHON}" "$@"
    fi
}

serve() {
    run_python scripts/serve.py --checkpoint "$(newest_checkpoint)" --port "${PORT}" "$@"
}

demo() {
    [ "${SIZE}" = debug ] || die "demo is for the debug size only (got '${SIZE}')"
    local steps="${STEPS:-40}"
    ./run_train.sh "${CONFIG}" "${RUN[@]}" --training.steps="${steps}" \
        --checkpoint.interval="${steps}" --training.local_batch_size=4 \
        --validation.enable=false "$@"
    echo "== generate" >&2
    "${ARBOR_PYTHON}" scripts/generate.py --checkpoint "$(newest_checkpoint)" \
        --prompt "def main(" --max-new-tokens 32 --temperature 0
    echo >&2
    echo "== serve on 127.0.0.1:${PORT}" >&2
    "${ARBOR_PYTHON}" scripts/serve.py --checkpoint "$(newest_checkpoint)" --port "${PORT}" &
    local server=$!
    trap 'kill "${server}" 2>/dev/null || true' EXIT
    local reply=""
    for _ in $(seq 120); do
        reply="$(curl -sf "http://127.0.0.1:${PORT}/v1/completions" \
            -H 'Content-Type: application/json' \
            -d '{"prompt": "import ", "max_tokens": 16, "temperature": 0}' 2>/dev/null)" && break
        kill -0 "${server}" 2>/dev/null || die "the server stopped before answering"
        sleep 1
    done
    [ -n "${reply}" ] || die "the server did not answer within 120 s"
    echo "== one request answered: ${reply}"
    kill "${server}"
    wait "${server}" 2>/dev/null || true
    trap - EXIT
}

case "${ACTION}" in
    plan) DRY_RUN=1 exec ./run_train.sh "${CONFIG}" "$@" ;;
    create) exec ./run_train.sh "${CONFIG}" "${RUN[@]}" --checkpoint.create_seed_checkpoint=true "$@" ;;
    train)
        if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
            [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a whole number >= 1, got '$1'"
            export NNODES="$1"
            shift
        fi
        steps=()
        [ -n "${STEPS:-}" ] && steps=(--training.steps="${STEPS}")
        exec ./run_train.sh "${CONFIG}" "${RUN[@]}" ${steps[@]+"${steps[@]}"} "$@" ;;
    serve) serve "$@" ;;
    benchmark)
        echo "== training throughput: ${STEPS:-20} steps of ${CONFIG}" >&2
        ./run_train.sh "${CONFIG}" --job.name="${JOB}_benchmark" --job.dump_folder=./outputs \
            --training.steps="${STEPS:-20}" --checkpoint.enable=false --validation.enable=false \
            --metrics.log_freq=5 "$@"
        echo "== inference speed: scripts/generate.py on the newest checkpoint" >&2
        run_python scripts/generate.py --checkpoint "$(newest_checkpoint)" \
            --prompt "def main(" --max-new-tokens 128 --temperature 0 >/dev/null ;;
    demo) demo "$@" ;;
esac
