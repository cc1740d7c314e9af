"""The planner for tensor parallel degrees that don't divide the kv heads (the 200b flavor's 12
at tp 8): shard shapes and placements of the replicated wk/wv, the memory they take, and the
activation terms of k/v copied per query head."""

from dataclasses import replace
from pathlib import Path

import pytest

from arbor_titan.config.cli import load_config
from arbor_titan.estimate import EstimateOptions, format_plan, plan
from arbor_titan.estimate.activations import ActivationModel
from arbor_titan.models.arbor import FLAVORS

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs/arbor_200b.toml"


def test_200b_at_tp_8_replicates_wk_wv_and_counts_them():
    result = plan(load_config(CONFIG), EstimateOptions(ranks="0"))
    dims, build = result.dims, result.ranks[0].build
    assert (dims.pp, dims.dp_shard, dims.tp, dims.world_size) == (8, 4, 8, 256)
    dim, ffn, q, kv = 12288, 49152, 96 * 128, 12 * 128
    # wq: rows split by tp 8, then by FSDP's 4 shards; wk/wv: whole on every tp rank, FSDP only.
    assert build.weights["wq"].local_shape == (q // 32, dim)
    assert build.weights["wk"].local_shape == build.weights["wv"].local_shape == (kv // 4, dim)
    assert build.weights["wk"].placements == "S(0), R"  # FSDP over dp, replicated over tp
    assert build.weights["wq"].float8 and not build.weights["wk"].float8
    # Parameters, gradients and AdamW's moments: every local shard, replicated wk/wv included.
    block = (2 * q * dim + 3 * dim * ffn) // 32 + 2 * kv * dim // 4 + 2 * dim // 4
    embedding = 128256 * dim // 32
    assert [len(s.layers) for s in build.stages] == [6, 6]
    assert build.local_numel == 12 * block + embedding
    memory = result.ranks[0].memory
    assert memory.parameters == memory.gradients == 4 * build.local_numel
    assert memory.optimizer == 2 * memory.parameters + 4 * build.local_param_tensors
    assert "kv heads   tp 8 does not divide the 12 kv heads" in format_plan(result, str(CONFIG))


def test_tp_must_divide_the_query_heads():
    cfg = load_config(
        CONFIG,
        ["--parallelism.tensor_parallel_degree=64", "--parallelism.data_parallel_shard_degree=1"],
    )
    with pytest.raises(ValueError, match=r"tensor_parallel_degree=64 must divide .*n_heads=96"):
        plan(cfg, EstimateOptions(ranks="0"))


def test_replicated_kv_activations_hold_a_kv_copy_per_query_head():
    """At tp 8 the 200b flavor's k/v saved for attention are as big as a multi-head model's
    (one kv head per query head); selective "op" checkpointing keeps only the 2 projected."""
    gqa = FLAVORS["200b"]
    mha = replace(gqa, n_kv_heads=gqa.n_heads)
    common = dict(
        tokens=8192,
        seq_tokens=1024,
        tp=8,
        compute_bytes=2,
        residual_bytes=2,
        autocast=False,
        fused_norm=True,
        vocab_shards=8,
    )
    replicated, multi_head = ActivationModel(gqa, **common), ActivationModel(mha, **common)
    assert replicated.block("none") == multi_head.block("none")
    kv_bytes = 8192 * 128 * 2  # one head of k or v for the micro-batch
    assert multi_head.block("op") - replicated.block("op") == 2 * (12 - 2) * kv_bytes
