"""The planner with context parallelism: the 2M-token configs fit an 80 GB GPU, `--seq-len` plans
another length, and the activation terms follow cp (the share of tokens, the gathered K/V) and
the chunked loss (no whole-sequence log-probabilities)."""

from dataclasses import replace
from pathlib import Path

import pytest

from arbor_titan.config.cli import load_config
from arbor_titan.estimate import EstimateOptions, plan
from arbor_titan.estimate.__main__ import main
from arbor_titan.estimate.activations import ActivationModel
from arbor_titan.models.arbor import FLAVORS

REPO = Path(__file__).resolve().parents[2]
TWO_M = 2**21


@pytest.mark.slow
@pytest.mark.parametrize("config", ["arbor_400b_2m", "arbor_200b_2m"])
def test_2m_configs_fit_on_80gb(config):
    cfg = load_config(REPO / f"train_configs/{config}.toml")
    result = plan(cfg, EstimateOptions(ranks="0"))
    assert (result.dims.cp, result.dims.pp, cfg.training.seq_len) == (64, 1, TWO_M)
    assert result.step.tokens_per_step == TWO_M  # one sequence per step
    assert result.fits, result.ranks[0].memory.as_dict()


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
    plain, cp4 = activation_model(), activation_model(cp=4)
    assert cp4.block("none") - plain.block("none") == 3 * kv_bytes  # 3 other ranks' K/V
    assert cp4.block("full") == plain.block("full")  # only the block input is kept
    assert cp4.block_backward_working("full") > plain.block_backward_working("full") + 4 * kv_bytes


def test_chunked_loss_keeps_no_log_probabilities():
    plain, chunked = activation_model(), activation_model(loss_chunk_tokens=128)
    log_probs = 1024 * FLAVORS["debug"].vocab_size * 4
    assert plain.head() - chunked.head() == log_probs
    assert chunked.loss_backward_working() == 3 * log_probs // 8
    wide = replace(FLAVORS["debug"], vocab_size=128256)
    assert activation_model(args=wide, loss_chunk_tokens=128).loss_backward_working() < (
        activation_model(args=wide).loss_backward_working() / 4
    )
