"""Initialization is a function of the seed and each parameter's name: a pipeline stage holding
some of the layers gets exactly those layers' weights of the whole model. (Sharded layouts are
checked end to end by tests/distributed/test_parity.py, which starts every layout from the seed.)"""

import torch

from arbor_titan.distributed.pipeline import local_model
from arbor_titan.models.arbor import ArborArgs, Transformer

ARGS = ArborArgs(
    dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=100, max_seq_len=16
)


def initialized(seed: int, stage_layers: list[range] | None = None) -> dict[str, torch.Tensor]:
    model = Transformer(ARGS)
    if stage_layers is not None:  # the last pipeline stage: no embedding
        local_model(model, stage_layers, has_first=False, has_last=True)
    torch.manual_seed(seed + 1000)  # the global RNG must not matter
    model.init_weights(seed=seed)
    return {name: param.detach() for name, param in model.named_parameters()}


def test_a_pipeline_stage_gets_the_whole_models_values():
    whole, stage = initialized(7), initialized(7, [range(2, 4)])
    assert "layers.2.attention.wq.weight" in stage and "layers.0.attention.wq.weight" not in stage
    for name, param in stage.items():
        assert torch.equal(param, whole[name]), name


def test_the_seed_changes_every_random_tensor_and_nothing_else_does():
    first, again, other = initialized(7), initialized(7), initialized(8)
    for name, param in first.items():
        assert torch.equal(param, again[name]), name
        random = param.dim() == 2
        assert torch.equal(param, other[name]) != random, name


def test_values_follow_the_init_rule():
    params = initialized(0)
    wq, wo = params["layers.0.attention.wq.weight"], params["layers.0.attention.wo.weight"]
    assert abs(float(wq.std()) - 0.02) < 0.002 and float(wq.abs().max()) <= 0.06
    # The residual writers are scaled down by sqrt(2 * n_layers).
    assert abs(float(wo.std()) - 0.02 / 8**0.5) < 0.001
    assert torch.equal(params["norm.weight"], torch.ones(ARGS.dim))
