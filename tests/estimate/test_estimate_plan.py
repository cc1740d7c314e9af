"""Dry runs of the enterprise configs on this CPU, shard accounting, and layout errors."""

import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate

from arbor_titan.config.cli import load_config
from arbor_titan.distributed.build import build_model
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.estimate import EstimateOptions, MemoryOptions, plan
from arbor_titan.estimate.activations import peak_in_flight
from arbor_titan.estimate.ranks import fake_process_group
from arbor_titan.models.arbor import Transformer, count_params, resolve_args

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def run_estimate(*args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, peak RSS GiB) of one `python -m arbor_titan.estimate` process.

    os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would fold in earlier children)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen(
            [sys.executable, "-m", "arbor_titan.estimate", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=null,
            text=True,
        )
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    result = subprocess.CompletedProcess(proc.args, os.waitstatus_to_exitcode(status), out, "")
    return result, seconds, usage.ru_maxrss * 1024 / GIB


def meta_param_count(flavor: str) -> int:
    with torch.device("meta"):
        return count_params(
            Transformer(resolve_args(load_config(None, [f"--model.flavor={flavor}"]).model))
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "flavor", "world"), [("arbor_200b", "200b", 256), ("arbor_400b", "400b", 512)]
)
def test_enterprise_dry_run_is_fast_small_and_adds_up(tmp_path, config, flavor, world):
    out = tmp_path / "plan.json"
    result, seconds, rss_gib = run_estimate(f"train_configs/{config}.toml", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:]
    assert seconds < 60 and rss_gib < 2, (seconds, rss_gib)
    report = json.loads(out.read_text())
    assert report["layout"]["world_size"] == world
    assert report["model"]["num_params"] == meta_param_count(flavor)
    assert report["model"]["sharded_params"] == report["model"]["num_params"]
    assert report["fits"] and "all" in result.stdout and "count_params ✓" in result.stdout
    # Every pipeline rank was simulated, each stage once, covering every layer exactly once.
    layers = sorted(
        layer
        for rank in {r["coordinate"]["pp"]: r for r in report["ranks"]}.values()
        for stage in rank["stages"]
        for layer in range(*stage["layers"])
    )
    assert layers == list(range(report["model"]["n_layers"]))


def test_400b_shards_and_memory_rows():
    cfg = load_config(REPO / "train_configs/arbor_400b.toml")
    result = plan(cfg, EstimateOptions(ranks="0,511"))
    first, last = (r.build for r in result.ranks)
    assert [(s.layers.start, s.layers.stop) for s in first.stages] == [(0, 4), (64, 68)]
    assert [(s.layers.start, s.layers.stop) for s in last.stages] == [(60, 64), (117, 120)]
    # tp 8 splits wq's rows, then FSDP's 4 shards split them again; wo splits columns for TP.
    assert first.weights["wq"].local_shape == (16384 // 32, 16384)
    assert first.weights["wo"].local_shape == (16384 // 4, 16384 // 8)
    assert first.weights["wq"].float8 and not last.weights["output"].float8
    assert "tok_embeddings" in first.weights and "output" in last.weights
    memory = result.ranks[0].memory
    assert memory.optimizer == 2 * memory.parameters + 4 * first.local_param_tensors
    assert memory.in_flight == {0: 32, 16: 15}  # Interleaved1F1B's warm-up on pipeline rank 0


def test_every_shard_counted_once_with_uneven_shards():
    """Simulate all 12 ranks of pp 2 × dp_shard 3 × tp 2 (the debug model shards unevenly 3 ways):
    local shards, each divided by how many ranks replicate it, add up to the model."""
    cfg = load_config(
        None,
        [
            "--parallelism.pipeline_parallel_degree=2",
            "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
            "--parallelism.tensor_parallel_degree=2",
            "--training.mixed_precision_param=bfloat16",
        ],
    )
    args = resolve_args(cfg.model, 2000, cfg.training.seq_len)
    total = Fraction(0)
    for rank in range(12):
        with fake_process_group(rank, 12):
            dims = ParallelDims.from_config(cfg.parallelism, 12)
            model = build_model(cfg, dims, args, None, torch.device("meta"), False).model
            for param in model.parameters():
                assert isinstance(param, DTensor)
                mesh, copies = param.device_mesh, 1
                for dim, placement in enumerate(param.placements):
                    copies *= mesh.size(dim) if isinstance(placement, Replicate) else 1
                total += Fraction(param.to_local().numel(), copies)
    with torch.device("meta"):
        assert total == count_params(Transformer(args))
    planned = plan(cfg, EstimateOptions(world_size=12, vocab_size=2000, ranks="all"))
    assert planned.sharded_params == planned.num_params == total


def test_schedule_walk_counts_in_flight_microbatches():
    one_f_one_b = [("F", 0)] * 3 + [("B", 0), ("F", 0), ("B", 0), ("B", 0), ("B", 0)]
    assert peak_in_flight(one_f_one_b, {0: 10}) == (30, {0: 3})
    # Zero-bubble: an input backward (I) keeps the activations until the weight backward (W).
    zero_bubble = [("F", 0), ("F", 1), ("I", 1), ("F", 0), ("W", 1), ("I", 0)]
    assert peak_in_flight(zero_bubble, {0: 1, 1: 5}) == (7, {0: 2, 1: 1})


def test_a_plan_that_does_not_fit_exits_nonzero(tmp_path):
    result, _, _ = run_estimate(
        "train_configs/debug_model.toml", "--gpu-memory-gib", "0.01", "--reserve-gib", "0"
    )
    assert result.returncode == 1
    assert "DOES NOT FIT: rank 0 needs" in result.stdout


def test_more_stages_than_layers():
    cfg = load_config(
        None,
        [
            "--parallelism.pipeline_parallel_degree=4",
            "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
        ],
    )
    with pytest.raises(ValueError, match=r"8 pipeline stages .* exceed the model's 4 layers"):
        plan(cfg, EstimateOptions(world_size=4))


def test_world_size_mismatch_names_the_layout_and_the_dry_run():
    cfg = load_config(REPO / "train_configs/arbor_400b.toml")
    with pytest.raises(ValueError, match=r"needs 512 ranks \(64 nodes × 8 GPUs.*DRY_RUN=1"):
        plan(cfg, EstimateOptions(world_size=8, memory=MemoryOptions()))


@pytest.mark.slow
def test_training_on_the_wrong_world_size_stops_before_data_and_model(tmp_path):
    """The 400b config launched as one process: its jsonl corpus doesn't exist, so reaching data
    preparation would fail differently; the run folder isn't even created."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "arbor_titan.train",
            "train_configs/arbor_400b.toml",
            f"--job.dump_folder={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "needs 512 ranks (64 nodes × 8 GPUs: NNODES=64 NGPU=8)" in result.stderr
    assert (
        "but the world size is 1" in result.stderr and "DRY_RUN=1 ./run_train.sh" in result.stderr
    )
    assert not any(tmp_path.iterdir())
