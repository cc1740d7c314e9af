"""The built-in RoPE scalings equal transformers' own implementation, factor 1 is plain RoPE, bad
settings are one-line errors naming the key, and model args keep their scaling through growth."""

import pytest
import torch

from arbor_titan.config.loader import ConfigError
from arbor_titan.growth.apply import Growth
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.rope import build_rope_scaling, plain_inv_freq, rope_cos_sin
from tests.conftest import dev_dependency

# Without it (outside scripts/test.sh) the identity and error tests still run.
transformers = dev_dependency("transformers")
if transformers is not None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
needs_transformers = pytest.mark.skipif(
    transformers is None, reason="needs transformers (pip install -e .[dev])"
)

# transformers computes in float32: measured differences reach 8e-7 of a frequency (theta 5e5).
RTOL = 1e-6


def ours(settings: dict, head_dim: int, theta: float, length: int) -> tuple[torch.Tensor, float]:
    scaling = build_rope_scaling(settings)
    return scaling.inv_freq(head_dim, theta, length), scaling.attention_factor(head_dim, theta)


def theirs(
    rope_type: str, params: dict, head_dim: int, theta: float, max_positions: int, **kwargs
) -> tuple[torch.Tensor, float]:
    """transformers' inverse frequencies and attention factor for a Llama with these settings."""
    config = transformers.LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params},
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, **kwargs)
    return inv_freq.double(), factor


def assert_same(ours_: tuple[torch.Tensor, float], theirs_: tuple[torch.Tensor, float]) -> None:
    # Relative: the scaled (low) frequencies are ~1e-5 of the fast ones; an absolute 1e-6
    # would not see them.
    torch.testing.assert_close(ours_[0], theirs_[0], rtol=RTOL, atol=0)
    assert ours_[1] == pytest.approx(theirs_[1], rel=1e-12)


SHAPES = [(64, 10_000.0), (128, 500_000.0), (16, 50_000.0)]  # head_dim, theta


@needs_transformers
@pytest.mark.parametrize(("head_dim", "theta"), SHAPES)
@pytest.mark.parametrize("factor", [2.0, 4.0, 32.0])
def test_linear_matches_transformers(head_dim, theta, factor):
    assert_same(
        ours({"type": "linear", "factor": factor}, head_dim, theta, 100),
        theirs("linear", {"factor": factor}, head_dim, theta, 100),
    )


@needs_transformers
@pytest.mark.parametrize(("head_dim", "theta"), SHAPES)
@pytest.mark.parametrize("factor", [1.5, 4.0, 16.0])
def test_ntk_matches_transformers(head_dim, theta, factor):
    """transformers has no fixed NTK-aware type; its dynamic one is that base for the ratio
    f·ℓ/L − (f − 1), which is s at ℓ = 2L with f = s − 1."""
    assert_same(
        ours({"type": "ntk", "factor": factor}, head_dim, theta, 100),
        theirs("dynamic", {"factor": factor - 1}, head_dim, theta, 256, seq_len=512),
    )


@needs_transformers
@pytest.mark.parametrize(("head_dim", "theta"), SHAPES)
@pytest.mark.parametrize(
    ("factor", "length"), [(2.0, 4096), (4.0, 1500), (1.0, 3000), (8.0, 1024), (3.0, 99)]
)
def test_dynamic_ntk_matches_transformers_at_each_table_length(head_dim, theta, factor, length):
    settings = {"type": "dynamic_ntk", "factor": factor, "original_max_seq_len": 1024}
    expected = theirs("dynamic", {"factor": factor}, head_dim, theta, 1024, seq_len=length)
    assert_same(ours(settings, head_dim, theta, length), expected)
    if length <= 1024:
        torch.testing.assert_close(expected[0], plain_inv_freq(head_dim, theta), rtol=RTOL, atol=0)


YARN = [
    {"factor": 4.0, "original_max_seq_len": 4096},
    {"factor": 16.0, "original_max_seq_len": 2048, "beta_fast": 16.0, "beta_slow": 2.0},
    {"factor": 8.0, "original_max_seq_len": 1000, "truncate": False},
    {"factor": 2.5, "original_max_seq_len": 512, "attention_factor": 0.8},
    {"factor": 40.0, "original_max_seq_len": 4096, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 4.0, "original_max_seq_len": 16},  # ramp clipped at both ends
]


@needs_transformers
@pytest.mark.parametrize(("head_dim", "theta"), SHAPES)
@pytest.mark.parametrize("params", YARN, ids=lambda p: "-".join(map(str, p.values())))
def test_yarn_matches_transformers(head_dim, theta, params):
    hf = {"original_max_position_embeddings": params["original_max_seq_len"]}
    hf.update({k: v for k, v in params.items() if k != "original_max_seq_len"})
    expected = theirs("yarn", hf, head_dim, theta, 8 * params["original_max_seq_len"])
    assert_same(ours({"type": "yarn", **params}, head_dim, theta, 100), expected)
    if "attention_factor" not in params:
        assert expected[1] > 1  # the factor is exercised, not left at 1


LLAMA3 = [
    {"factor": 8.0, "original_max_seq_len": 8192},  # Llama 3.1's low 1, high 4 by default
    {"factor": 4.0, "original_max_seq_len": 2048, "low_freq_factor": 0.5, "high_freq_factor": 8},
    {"factor": 16.0, "original_max_seq_len": 256, "low_freq_factor": 2.0, "high_freq_factor": 3},
]


@needs_transformers
@pytest.mark.parametrize(("head_dim", "theta"), SHAPES)
@pytest.mark.parametrize("params", LLAMA3, ids=lambda p: "-".join(map(str, p.values())))
def test_llama3_matches_transformers(head_dim, theta, params):
    hf = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hf["original_max_position_embeddings"] = params["original_max_seq_len"]
    hf.update({k: v for k, v in params.items() if k != "original_max_seq_len"})
    expected = theirs("llama3", hf, head_dim, theta, 16 * params["original_max_seq_len"])
    assert_same(ours({"type": "llama3", **params}, head_dim, theta, 100), expected)


IDENTITY = {
    "linear": {},
    "ntk": {},
    # Identity for tables up to the original length only: past it, transformers' dynamic NTK
    # rescales by ℓ/L even at factor 1 (see the (1.0, 3000) case above).
    "dynamic_ntk": {"original_max_seq_len": 256},
    "yarn": {"original_max_seq_len": 64},
    "llama3": {"original_max_seq_len": 64},
}


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_factor_one_is_plain_rope(name):
    settings = {"type": name, "factor": 1.0, **IDENTITY[name]}
    for head_dim, theta in SHAPES:
        plain = rope_cos_sin(head_dim, 256, theta)
        torch.testing.assert_close(rope_cos_sin(head_dim, 256, theta, settings), plain)
        assert build_rope_scaling(settings).attention_factor(head_dim, theta) == 1.0


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_a_factor_above_one_changes_the_table(name):
    """So the identity test above can tell a scaling from plain RoPE (on a table longer than
    every original length there, which dynamic NTK needs to scale at all)."""
    settings = {"type": name, "factor": 4.0, **IDENTITY[name]}
    table = rope_cos_sin(64, 1024, 10_000.0, settings)
    assert (table - rope_cos_sin(64, 1024, 10_000.0)).abs().max() > 0.1


def error(settings: dict) -> str:
    with pytest.raises(ConfigError) as err:
        build_rope_scaling(settings, where="context.rope_params")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_scaling_names_the_key_and_the_registered_ones():
    message = error({"type": "longrope", "factor": 2.0})
    assert message.startswith("context.rope_params.type: unknown rope_scaling 'longrope'")
    for name in ("dynamic_ntk", "linear", "llama3", "ntk", "yarn"):
        assert name in message


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"type": "yarn", "factor": 2.0}, "context.rope_params.original_max_seq_len: required"),
        ({"type": "linear"}, "context.rope_params.factor: required by linear"),
        ({"type": "ntk", "factor": 2.0, "beta": 1}, "unknown key 'context.rope_params.beta'"),
        ({"type": "linear", "factor": 0.5}, "context.rope_params.factor must be >= 1"),
        ({"type": "llama3", "factor": 2.0, "original_max_seq_len": 0}, "original_max_seq_len"),
        ({"type": "linear", "factor": "4"}, "context.rope_params.factor expects float"),
    ],
)
def test_bad_params_name_the_key(settings, named):
    assert named in error(settings)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"beta_fast": 1.0, "beta_slow": 2.0}, "beta_fast (1.0) must exceed beta_slow (2.0)"),
        ({"mscale": 1.0}, "mscale and mscale_all_dim"),
        ({"attention_factor": 1.2, "mscale": 1.0, "mscale_all_dim": 1.0}, "attention_factor"),
    ],
)
def test_inconsistent_yarn_params_are_refused(params, named):
    message = error({"type": "yarn", "factor": 2.0, "original_max_seq_len": 64, **params})
    assert message.startswith("[context.rope_params]: ") and named in message


def test_inconsistent_llama3_factors_are_refused():
    settings = {"type": "llama3", "factor": 2.0, "original_max_seq_len": 64}
    message = error({**settings, "low_freq_factor": 4.0, "high_freq_factor": 1.0})
    assert "high_freq_factor (1.0) must exceed low_freq_factor (4.0)" in message


def test_the_scaling_survives_growth():
    """Growth operators build the grown args with `dataclasses.replace`: the scaling stays."""
    scaling = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 32}
    args = ArborArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=100,
        rope_scaling=scaling,
    )  # fmt: skip
    for op, params in (("deepen", {"layers": [0]}), ("widen_ffn", {"ffn_dim": 256})):
        assert Growth.create(op, args, params).new_args.rope_scaling == scaling
