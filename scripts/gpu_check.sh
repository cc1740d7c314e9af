#!/usr/bin/env bash
# GPU check: scripts/gpu_check.sh [--section.key=value ...]   (extra overrides apply to every run)
#
# Trains through the real entry point (run_train.sh) on CUDA and prints tokens/s, MFU and peak
# memory of each run, measured over the last logged window (after torch.compile's warm-up):
#   1. debug and bench models, bf16 + torch.compile: autocast on 1 GPU; with 2+ GPUs visible
#      also FSDP2 (bf16 mixed precision) on 2 of them;
#   2. bench with real float8 linears against the same run in bf16 (needs compute capability
#      8.9+: Ada, Hopper, Blackwell); with 2+ GPUs also with FSDP2 float8 all-gather;
#   3. the dry-run planner's estimate for the eager bf16 bench run against its measured peak.
# Exits 2 at once on a machine without CUDA, 1 if any run fails or float8 loses > 2% loss.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

"${ARBOR_PYTHON}" - <<'EOF' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda}); run this on a GPU machine with a CUDA build of torch "
        "(ARBOR_TORCH_SPEC='torch>=2.13' in scripts/env.sh)"
    )
name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
print(f"gpu_check: {torch.cuda.device_count()} x {name} (sm{cap[0]}{cap[1]}), torch {torch.__version__}")
EOF

GPUS="$("${ARBOR_PYTHON}" -c 'import torch; print(torch.cuda.device_count())')"
FLOAT8_OK="$("${ARBOR_PYTHON}" -c 'import torch; print(int(torch.cuda.get_device_capability() >= (8, 9)))')"
OUT="outputs/gpu_check"
rm -rf "${OUT}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${PWD}/outputs/.inductor_cache}"

# lr 1e-3, not the debug config's 3e-3: at 3e-3 short runs are chaotic enough that bf16 and
# float8 end up to ±2% apart by seed alone (measured on CPU), which would hide real float8 error.
COMMON=(
    --job.dump_folder="${OUT}"
    --optimizer.lr=1e-3
    --training.steps=60
    --training.mixed_precision_param=bfloat16
    --lr_scheduler.warmup_steps=10
    --metrics.log_freq=10
    --metrics.enable_tensorboard=false
    --validation.enable=false
    --checkpoint.enable=false
)
DEBUG=(--model.flavor=debug --training.seq_len=512 --training.local_batch_size=32)
BENCH=(--model.flavor=bench --tokenizer.vocab_size=8000 --training.seq_len=1024
       --training.local_batch_size=32)
COMPILE=(--compile.enable=true)
FLOAT8=(--float8.enable_float8_linear=true)
FSDP_FLOAT8=(--float8.enable_float8_linear=true --float8.enable_fsdp_float8_all_gather=true
             --float8.precompute_float8_dynamic_scale_for_fsdp=true)

RUNS=()
run() {  # run NAME NGPU OVERRIDES...
    local name="$1" ngpu="$2"
    shift 2
    echo "== ${name} (${ngpu} GPU)"
    if NGPU="${ngpu}" ./run_train.sh train_configs/debug_model.toml --job.name="${name}" \
        "${COMMON[@]}" "$@" >"${OUT}/${name}.log" 2>&1; then
        RUNS+=("${name}")
    else
        echo "   FAILED, last lines of ${OUT}/${name}.log:"
        tail -n 20 "${OUT}/${name}.log"
        FAILED=1
    fi
}
FAILED=0
mkdir -p "${OUT}"

run debug_bf16_compile 1 "${DEBUG[@]}" "${COMPILE[@]}" "$@"
run bench_bf16_compile 1 "${BENCH[@]}" "${COMPILE[@]}" "$@"
run bench_bf16_eager 1 "${BENCH[@]}" "$@"
if [ "${FLOAT8_OK}" = "1" ]; then
    run bench_float8_compile 1 "${BENCH[@]}" "${COMPILE[@]}" "${FLOAT8[@]}" "$@"
else
    echo "== float8 skipped: needs compute capability 8.9+ (the trainer refuses it with a clear error)"
fi
if [ "${GPUS}" -ge 2 ]; then
    run debug_fsdp2_bf16_compile 2 "${DEBUG[@]}" "${COMPILE[@]}" "$@"
    run bench_fsdp2_bf16_compile 2 "${BENCH[@]}" "${COMPILE[@]}" "$@"
    if [ "${FLOAT8_OK}" = "1" ]; then
        run bench_fsdp2_float8_compile 2 "${BENCH[@]}" "${COMPILE[@]}" "${FSDP_FLOAT8[@]}" "$@"
    fi
else
    echo "== FSDP2 runs skipped: one GPU visible (FSDP2 shards over 2+ ranks)"
fi

echo "== dry-run estimate of bench_bf16_eager (1 GPU)"
"${ARBOR_PYTHON}" -m arbor_titan.estimate train_configs/debug_model.toml --world-size 1 \
    --reserve-gib 0 --json "${OUT}/estimate_bench_eager.json" \
    "${COMMON[@]}" "${BENCH[@]}" "$@" >"${OUT}/estimate.log" 2>&1 || {
    echo "   estimate FAILED:"; tail -n 20 "${OUT}/estimate.log"; FAILED=1; }

"${ARBOR_PYTHON}" - "${OUT}" "${RUNS[@]+"${RUNS[@]}"}" <<'EOF' || FAILED=1
import json
import sys
from pathlib import Path

out, runs = Path(sys.argv[1]), sys.argv[2:]
last = {}
print(f"\n{'run':<28} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9} {'loss':>8}")
for run in runs:
    records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    record = [r for r in records if "loss" in r and "event" not in r][-1]
    last[run] = record
    print(
        f"{run:<28} {record['tokens_per_second']:>12,.0f} {record['mfu']:>7.1%} "
        f"{record['memory_gib']:>9.2f} {record['loss']:>8.4f}"
    )

status = 0
for bf16, fp8 in [
    ("bench_bf16_compile", "bench_float8_compile"),
    ("bench_fsdp2_bf16_compile", "bench_fsdp2_float8_compile"),
]:
    if bf16 in last and fp8 in last:
        speed = last[fp8]["tokens_per_second"] / last[bf16]["tokens_per_second"]
        gap = last[fp8]["loss"] / last[bf16]["loss"] - 1
        ok = abs(gap) <= 0.02
        status |= not ok
        print(f"float8 vs bf16 ({fp8}): {speed:.2f}x tokens/s, loss {gap:+.2%} {'ok' if ok else 'FAIL'}")

estimate = out / "estimate_bench_eager.json"
if estimate.exists() and "bench_bf16_eager" in last:
    memory = json.loads(estimate.read_text())["ranks"][0]["memory_bytes"]
    estimated, measured = memory["total"] / 2**30, last["bench_bf16_eager"]["memory_gib"]
    print(
        f"planner estimate (eager bench, no reserve): {estimated:.2f} GiB vs measured peak "
        f"allocated {measured:.2f} GiB ({estimated / measured - 1:+.0%})"
    )
sys.exit(status)
EOF

if [ "${FAILED}" != "0" ]; then
    echo "gpu_check: FAILED"
    exit 1
fi
echo "gpu_check: all runs passed"
