"""RoPE at inference: the cache's table comes from the args' scaling (dynamic NTK for the cache's
whole length), the context length follows the scaling, and the command line's override sets the
scaling and the length it reaches, or fails naming the flag and the registered scalings."""

from dataclasses import dataclass

import pytest
import torch

from arbor_titan import registry
from arbor_titan.config.loader import ConfigError
from arbor_titan.models.arbor.rope import (
    RopeScaling,
    plain_inv_freq,
    rope_cos_sin,
    rope_frequencies,
)
from plugins.inference.decoder import ArborCachedForward
from plugins.inference.loading import load_model
from plugins.inference.rope import RopeOverride, context_length, rope_table
from tests.plugins.inference.tiny import random_model, tiny_args

YARN = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}


@dataclass
class ShiftParams:
    shift: float = 1.0


@registry.register("rope_scaling", "test_shifted_theta")
class ShiftedTheta(RopeScaling):
    """A user's scaling: plain RoPE with the base raised by `shift`."""

    Params = ShiftParams

    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        return plain_inv_freq(head_dim, theta + self.params.shift)


def test_the_table_comes_from_the_registered_scaling():
    args = tiny_args(rope_scaling={"type": "test_shifted_theta", "shift": 5000.0})
    table = rope_table(args, 100)
    assert table.shape == (2, 100, args.head_dim)
    assert torch.equal(table, rope_cos_sin(args.head_dim, 100, args.rope_theta + 5000.0))
    plain = tiny_args(rope_scaling={"type": "default"})
    assert torch.equal(rope_table(plain, 10), rope_cos_sin(plain.head_dim, 10, plain.rope_theta))
    with pytest.raises(ConfigError, match="unknown rope_scaling 'no_such'; registered: .*yarn"):
        rope_table(tiny_args(rope_scaling={"type": "no_such"}), 10)


def test_dynamic_ntk_table_is_computed_once_for_the_cache_length():
    settings = {"type": "dynamic_ntk", "factor": 2.0, "original_max_seq_len": 64}
    model = random_model(tiny_args(rope_scaling=settings))
    forward = ArborCachedForward(model, slots=1, max_len=200)
    expected = rope_cos_sin(model.args.head_dim, 200, model.args.rope_theta, settings)
    assert torch.equal(forward.rope, expected)
    # Not the first 200 positions of a table for another length: the base depends on it.
    longer = rope_cos_sin(model.args.head_dim, 400, model.args.rope_theta, settings)
    assert (forward.rope - longer[:, :200]).abs().max() > 0.1


def test_context_length_follows_the_scaling():
    assert context_length(tiny_args(max_seq_len=64)) == 64
    assert context_length(tiny_args(max_seq_len=32, rope_scaling=YARN)) == 64  # 16 × 4
    assert context_length(tiny_args(max_seq_len=100, rope_scaling=YARN)) == 100
    # linear and ntk record no original length: the training length is what they were set for
    linear = {"type": "linear", "factor": 4.0}
    assert context_length(tiny_args(max_seq_len=64, rope_scaling=linear)) == 64


@pytest.mark.parametrize(
    ("checkpoint_scaling", "override", "scaling", "max_seq_len"),
    [
        # A plain checkpoint trained at 64: the original length defaults to it.
        (None, RopeOverride("yarn", {"factor": 4.0}), {**YARN, "original_max_seq_len": 64}, 256),
        (None, RopeOverride("linear", {"factor": 2}), {"type": "linear", "factor": 2}, 128),
        (
            None,
            RopeOverride("llama3", {"factor": 4.0, "original_max_seq_len": 32}),
            {"type": "llama3", "factor": 4.0, "original_max_seq_len": 32},
            128,
        ),
        # A checkpoint extended 16 -> 64 by YaRN: a new factor counts from its original 16.
        (YARN, RopeOverride(None, {"factor": 8.0}), {**YARN, "factor": 8.0}, 128),
        (
            YARN,
            RopeOverride("dynamic_ntk", {"factor": 16.0}),
            {"type": "dynamic_ntk", "factor": 16.0, "original_max_seq_len": 16},
            256,
        ),
        (YARN, RopeOverride("none", {}), None, 64),
    ],
)
def test_override_sets_the_scaling_and_the_length_it_reaches(
    checkpoint_scaling, override, scaling, max_seq_len
):
    args = override.apply(tiny_args(max_seq_len=64, rope_scaling=checkpoint_scaling))
    assert args.rope_scaling == scaling and args.max_seq_len == max_seq_len
    assert context_length(args) == max_seq_len


@pytest.mark.parametrize(
    ("checkpoint_scaling", "override", "named"),
    [
        (None, RopeOverride("nope", {}), "--rope-scaling: unknown rope_scaling 'nope'; registered"),
        (None, RopeOverride("none", {"factor": 2.0}), "--rope-scaling none: plain RoPE takes no"),
        (None, RopeOverride(None, {"factor": 2.0}), "name one with --rope-scaling (dynamic_ntk"),
        (None, RopeOverride("yarn", {"factor": 0.5}), "--rope-param.factor must be >= 1"),
        (None, RopeOverride("yarn", {}), "--rope-param.factor: required by yarn"),
        (YARN, RopeOverride(None, {"beta_fst": 8}), "unknown key '--rope-param.beta_fst'"),
    ],
)
def test_bad_overrides_name_the_flag(checkpoint_scaling, override, named):
    with pytest.raises(ValueError) as err:
        override.apply(tiny_args(rope_scaling=checkpoint_scaling))
    assert named in str(err.value) and "\n" not in str(err.value)
    if "registered" in named:
        assert all(name in str(err.value) for name in ("linear", "llama3", "ntk", "yarn", "none"))


def test_loaded_model_runs_its_own_forward_over_the_extended_length(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, rope=RopeOverride("yarn", {"factor": 2.0}))
    assert loaded.args.rope_scaling == {**YARN, "factor": 2.0, "original_max_seq_len": 64}
    assert loaded.model.rope_length == 128
    expected = rope_frequencies(
        loaded.args.head_dim, 128, loaded.args.rope_theta, loaded.args.rope_scaling
    )
    inv_freq, factor = loaded.model.rope_frequencies()
    assert torch.equal(inv_freq, expected[0]) and factor == expected[1]
    with torch.no_grad():
        assert torch.isfinite(loaded.model(torch.arange(1, 121)[None])).all()
