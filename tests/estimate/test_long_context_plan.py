"""The planner with context parallelism: the 2M-token configs fit an 80 GB GPU, `--seq-len` plans
another length and a `[context]` schedule its longest stage, the smallest cp that fits is found,
and the activation terms follow cp (the share of tokens, the gathered K/V) and the chunked loss
(no whole-sequence log-probabilities)."""

from dataclasses import replace
from pathlib import Path

import pytest

from arbor_titan.config.cli import load_config
from arbor_titan.estimate import EstimateOptions, MemoryOptions, plan
from arbor_titan.estimate.__main__ import main
from arbor_titan.estimate.activations import ActivationModel
from arbor_titan.estimate.context_fit import cp_candidates, smallest_fitting_cp, with_cp
from arbor_titan.estimate.memory import GIB
from arbor_titan.estimate.plan import planned_length
from arbor_titan.models.arbor import FLAVORS

REPO = Path(__file__).resolve().parents[2]
TWO_M = 2**21


@pytest.mark.slow
@pytest.mark.parametrize("config", ["arbor_400b_2m", "arbor_200b_2m"])
def test_2m_configs_fit_on_80gb_and_need_their_cp(config):
    cfg = load_config(REPO / f"train_configs/{config}.toml")
    result = plan(cfg, EstimateOptions(ranks="0"))
    assert (result.dims.cp, result.dims.pp, cfg.training.seq_len) == (64, 1, TWO_M)
    assert result.step.tokens_per_step == TWO_M  # one sequence per step
    assert result.fits, result.ranks[0].memory.as_dict()
    if config != "arbor_400b_2m":
        return  # one config's search (a plan at one more cp) is enough for the suite's time
    # cp 64 is needed: the next smaller degree (32, half the GPUs) does not fit.
    fit = smallest_fitting_cp(cfg, EstimateOptions(ranks="0"), result, (TWO_M,))
    capacity = result.ranks[0].memory.capacity
    assert fit.smallest == fit.configured and fit.smallest.peak <= capacity
    assert (fit.below.cp, fit.below.dims.world_size) == (32, result.dims.world_size // 2)
    assert fit.below.peak > capacity


def test_seq_len_flag_plans_that_length_split_over_cp(capsys):
    argv = [
        str(REPO / "train_configs/debug_model.toml"),
        "--seq-len",
        "1024",
        "--parallelism.context_parallel_degree=2",
        "--vocab-size=512",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cp 2 × tp 1 = 2 ranks" in out
    assert "1,024 tokens a sequence over 2 cp ranks: 512 each" in out


def activation_model(**changes) -> ActivationModel:
    fields = dict(
        args=FLAVORS["debug"],
        tokens=1024,
        seq_tokens=1024,
        tp=1,
        compute_bytes=2,
        residual_bytes=2,
        autocast=False,
        fused_norm=True,
        vocab_shards=1,
    )
    return ActivationModel(**{**fields, **changes})


def test_cp_keeps_the_gathered_keys_and_values():
    args = FLAVORS["debug"]
    kv_bytes = 1024 * 2 * args.n_kv_heads * args.head_dim * 2  # this rank's K and V in bf16
    attention_out = 1024 * args.n_heads * args.head_dim * 2  # wo's input: the chunks' concatenation
    plain, cp4 = activation_model(), activation_model(cp=4)
    # The 3 other ranks' K/V, and the attention output kept twice (by each chunk's SDPA and wo).
    assert cp4.block("none") - plain.block("none") == 3 * kv_bytes + attention_out
    assert cp4.block("full") == plain.block("full")  # only the block input is kept
    assert cp4.block_backward_working("full") > plain.block_backward_working("full") + 4 * kv_bytes


def test_torch_ring_keeps_its_own_kv_repeated_to_the_query_heads():
    args = FLAVORS["debug"]  # 4 query heads, 2 kv heads
    head_kv = 1024 * 2 * args.head_dim * 2  # one head's K and V for this rank's tokens, bf16
    attention_out = 1024 * args.n_heads * args.head_dim * 2
    gather, ring = activation_model(cp=4), activation_model(cp=4, ring_attention=True)
    # The all-gather keeps its kv heads for the whole sequence and the attention output twice;
    # the ring keeps its own tokens' K/V, repeated to the query heads, and the output once.
    assert gather.block("none") - ring.block("none") == (
        4 * args.n_kv_heads * head_kv - args.n_heads * head_kv + attention_out
    )
    # Backward: the ring gathers the whole sequence's repeated K/V again beside their gradient.
    extra_backward = 2 * 4 * args.n_heads * head_kv - 4 * args.n_kv_heads * head_kv
    assert ring.block_backward_working("full") - gather.block_backward_working("full") == (
        ring.recompute("full") - gather.recompute("full") + extra_backward
    )
    cfg = with_cp(load_config(REPO / "train_configs/debug_model.toml", DEBUG_16K), 4)
    ring_cfg = replace(
        cfg, parallelism=replace(cfg.parallelism, context_parallel_attention="torch_ring")
    )
    options = EstimateOptions(vocab_size=512)
    ring_memory, gather_memory = (plan(c, options).ranks[0].memory for c in (ring_cfg, cfg))
    assert ring_memory.activations < gather_memory.activations  # the planner plans the ring
    assert ring_memory.backward_working > gather_memory.backward_working


def test_chunked_loss_keeps_no_log_probabilities():
    plain, chunked = activation_model(), activation_model(loss_chunk_tokens=128)
    log_probs = 1024 * FLAVORS["debug"].vocab_size * 4
    assert plain.head() - chunked.head() == log_probs
    assert chunked.loss_backward_working() == 3 * log_probs // 8
    wide = replace(FLAVORS["debug"], vocab_size=128256)
    assert activation_model(args=wide, loss_chunk_tokens=128).loss_backward_working() < (
        activation_model(args=wide).loss_backward_working() / 4
    )


DEBUG_16K = ["--training.seq_len=16384"]  # 8 sequences of 16K: the debug model needs cp


def debug_plan(cp: int, capacity_gib: float = 80.0, world_size: int | None = None):
    cfg = with_cp(load_config(REPO / "train_configs/debug_model.toml", DEBUG_16K), cp)
    options = EstimateOptions(
        world_size=world_size, memory=MemoryOptions(capacity_gib), vocab_size=512
    )
    return cfg, options, plan(cfg, options)


def peak(result) -> int:
    return max(rank.memory.total for rank in result.ranks)


def test_search_finds_the_smallest_cp_that_fits():
    # A capacity between the plans' own peaks at cp 4 and cp 8: cp 8 is the answer, from any side.
    capacity_gib = (peak(debug_plan(4)[2]) + peak(debug_plan(8)[2])) / 2 / GIB
    answers = {}
    for configured in (1, 8, 16):
        cfg, options, result = debug_plan(configured, capacity_gib)
        fit = smallest_fitting_cp(cfg, options, result, (16384,))
        answers[configured] = (fit.smallest.cp, fit.below.cp)
        assert fit.smallest.peak <= fit.capacity < fit.below.peak
        assert fit.smallest.peak == peak(debug_plan(8)[2])  # the search plans what plan() does
        assert fit.smallest.dims.world_size == 8  # dp_shard 1 kept: the world follows cp
    assert answers == {1: (8, 4), 8: (8, 4), 16: (8, 4)}


def test_search_reports_when_no_cp_fits(capsys):
    # Below cp 16's peak nothing fits: 16 is the largest candidate (1,024 tokens a rank).
    capacity_gib = round(peak(debug_plan(16)[2]) / GIB - 0.01, 2)  # as the report prints it
    cfg, options, result = debug_plan(1, capacity_gib)
    fit = smallest_fitting_cp(cfg, options, result, (16384,))
    assert fit.smallest is None and fit.largest.cp == 16 and fit.largest.peak > fit.capacity
    config = str(REPO / "train_configs/debug_model.toml")
    argv = [config, "--seq-len=16384", "--vocab-size=512", f"--gpu-memory-gib={capacity_gib}"]
    assert main(argv) == 1
    assert f"cp needed  no cp fits {capacity_gib:.2f} GiB: cp 16 needs" in capsys.readouterr().out


def test_search_at_a_fixed_world_takes_cp_from_dp_shard():
    # dp_shard -1 planned for 4 ranks keeps 4 ranks: cp can only be 2 or 4, at dp_shard 2 or 1.
    capacity_gib = peak(debug_plan(2)[2]) / GIB + 0.01
    cfg, options, result = debug_plan(1, capacity_gib, world_size=4)
    assert not result.fits
    fit = smallest_fitting_cp(cfg, options, result, (16384,))
    assert fit.keeps_world and fit.smallest.cp == 2
    assert (fit.smallest.dims.dp_shard, fit.smallest.dims.world_size) == (2, 4)
    cfg, options, result = debug_plan(1, peak(debug_plan(8)[2]) / GIB, world_size=4)
    fit = smallest_fitting_cp(cfg, options, result, (16384,))
    assert fit.smallest is None and fit.largest.cp == 4  # 8 would need more than 4 ranks


def test_a_fitting_config_says_whether_its_cp_is_the_smallest(capsys):
    config = str(REPO / "train_configs/debug_model.toml")
    argv = [config, "--seq-len=16384", "--vocab-size=512"]
    assert main([*argv, "--parallelism.context_parallel_degree=2"]) == 0
    assert "cp needed  cp 1 is the smallest that fits (pp 1" in capsys.readouterr().out
    capacity_gib = round((peak(debug_plan(4)[2]) + peak(debug_plan(8)[2])) / 2 / GIB, 2)
    cp8 = [*argv, "--parallelism.context_parallel_degree=8", f"--gpu-memory-gib={capacity_gib}"]
    assert main(cp8) == 0
    assert "cp needed  cp 8 is the smallest that fits; cp 4 needs" in capsys.readouterr().out
    assert main([config, "--vocab-size=512"]) == 0  # cp 1 fits: nothing to search, no line
    assert "cp needed" not in capsys.readouterr().out


def test_cp_candidates_split_every_length_into_head_and_tail_chunks():
    assert cp_candidates((TWO_M,), TWO_M, None)[0] == [2**i for i in range(12)]  # ≥ 1,024 each
    assert cp_candidates((64, 1024), 1024, None)[0] == [1]  # 1,024 tokens: cp 1 only
    assert cp_candidates((256, 16384), 16384, None)[0] == [1, 2, 4, 8, 16]
    # At a fixed world cp divides the ranks it shares with dp_shard: 5 and 10 don't split 12,288.
    assert cp_candidates((12288,), 12288, 12)[0] == [1, 2, 3, 4, 6, 12]
    assert cp_candidates((12288,), 12288, 10)[0] == [1, 2]
    assert cp_candidates((512, 16384), 16384, None)[0] == [1, 2, 4, 8, 16]


def test_a_context_schedule_is_planned_at_its_longest_stage(capsys):
    cfg = load_config(REPO / "train_configs/debug_context.toml")
    length = planned_length(cfg)
    # Warmup 64 -> 256, stages 512 and 1,024; keep_tokens_per_step: 3,072 tokens a micro-batch.
    assert (length.config.training.seq_len, length.config.training.local_batch_size) == (1024, 3)
    assert {64, 256, 512, 1024} <= set(length.lengths)
    assert planned_length(cfg, seq_len=128).config.training.seq_len == 128
    assert planned_length(cfg, seq_len=128).lengths == (128,)
    assert main([str(REPO / "train_configs/debug_context.toml"), "--vocab-size=512"]) == 0
    out = capsys.readouterr().out
    assert "length     1,024 tokens × local_batch_size 3, from the longest stage of" in out


def test_a_cp_that_does_not_split_every_length_is_refused(capsys):
    # debug_context warms up from 64 tokens: cp 64 can't cut it into 128 chunks; training refuses.
    config = str(REPO / "train_configs/debug_context.toml")
    assert main([config, "--vocab-size=512", "--parallelism.context_parallel_degree=64"]) == 2
    err = capsys.readouterr().err
    assert "parallelism.context_parallel_degree=64: sequence length 64 is not divisible" in err
    assert err.rstrip().endswith("(64, 128, 192, 256, 512, 1024): 1, 2, 4, 8, 16, 32")
