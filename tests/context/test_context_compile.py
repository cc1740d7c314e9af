"""Compiled blocks across a context schedule's lengths: dynamo's automatic dynamic shapes make
the second length compile one graph with a symbolic length and batch, which every later shape
(and a new RoPE table) reuses — two compiles per block, not one per length."""

import dataclasses

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from arbor_titan.distributed.compile import compile_blocks
from arbor_titan.models.arbor import FLAVORS, Transformer

# (seq_len, batch) of a warmup then stages with keep_tokens_per_step: 512 tokens a micro-batch.
SHAPES = [(32, 16), (64, 8), (96, 4), (128, 4), (256, 2), (64, 8)]


@pytest.fixture
def counter(monkeypatch) -> CompileCounter:
    """Every `Module.compile` counts its graphs (no code generation: dynamo's decisions only)."""
    counter, original = CompileCounter(), nn.Module.compile
    monkeypatch.setattr(
        nn.Module, "compile", lambda self, **kwargs: original(self, backend=counter, **kwargs)
    )
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_a_handful_of_lengths_compiles_each_block_twice(counter):
    torch.manual_seed(0)
    args = dataclasses.replace(
        FLAVORS["debug"], vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64,
        max_seq_len=256,
    )  # fmt: skip
    model = Transformer(args)
    model.init_weights()
    compile_blocks(model.layers)
    graphs = []
    for i, (seq_len, batch) in enumerate(SHAPES):
        if i == 3:  # a stage's new scaling: a new table of the same shape
            scaled = dataclasses.replace(args, rope_scaling={"type": "linear", "factor": 2.0})
            model.args = scaled
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len))
        model(tokens).float().mean().backward()
        graphs.append(counter.frame_count)
    # The four blocks share one code object: the first shape compiles a static graph, the
    # second a dynamic one; no later length, batch or table compiles again.
    assert graphs == [1, 2, 2, 2, 2, 2]
