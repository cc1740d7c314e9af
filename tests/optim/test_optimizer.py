"""Which parameters decay, which AdamW implementation runs, and that FSDP2 DTensors work."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from arbor_titan.optim import LRSchedulerConfig, OptimizerConfig, build_optimizer
from arbor_titan.optim.optimizer import implementation_kwargs


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.norm = nn.RMSNorm(8)
        self.output = nn.Linear(8, 16, bias=False)
        self.frozen = nn.Parameter(torch.ones(8, 8), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(self.proj(self.tok_embeddings(tokens))))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    tokens = torch.arange(6).view(2, 3)
    for _ in range(steps):
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_no_decay_for_1d_params_and_embeddings():
    model = Tiny()
    decay, no_decay = build_optimizer(model, OptimizerConfig(weight_decay=0.1)).param_groups
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.output.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.tok_embeddings.weight),
        id(model.proj.bias),
        id(model.norm.weight),
    }
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_hyperparameters_reach_the_optimizer():
    cfg = OptimizerConfig(lr=3e-4, betas=[0.8, 0.9], eps=1e-6)
    defaults = build_optimizer(Tiny(), cfg).defaults
    assert (defaults["lr"], defaults["betas"], defaults["eps"]) == (3e-4, (0.8, 0.9), 1e-6)


@pytest.mark.parametrize(
    ("implementation", "fused", "foreach"),
    [
        ("auto", True, False),
        ("fused", True, False),
        ("foreach", False, True),
        ("for-loop", False, False),
    ],
)
def test_implementation_selection_on_cpu(implementation, fused, foreach):
    defaults = build_optimizer(Tiny(), OptimizerConfig(implementation=implementation)).defaults
    assert (defaults["fused"], defaults["foreach"]) == (fused, foreach)


def test_auto_falls_back_to_foreach_without_fused_kernels():
    assert implementation_kwargs("auto", [torch.empty(2, device="meta")]) == {
        "fused": False,
        "foreach": True,
    }


def test_implementations_agree():
    torch.manual_seed(0)
    reference = Tiny()
    models = {}
    for implementation in ("fused", "foreach", "for-loop"):
        model = Tiny()
        model.load_state_dict(reference.state_dict())
        _train(model, build_optimizer(model, OptimizerConfig(implementation=implementation)))
        models[implementation] = model
    for name, param in models["for-loop"].named_parameters():
        for other in ("fused", "foreach"):
            torch.testing.assert_close(dict(models[other].named_parameters())[name], param)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Adam"}, "optimizer.name must be one of 'AdamW', got 'Adam'"),
        ({"implementation": "apex"}, "optimizer.implementation must be one of 'auto', "),
        ({"betas": [0.9]}, "optimizer.betas"),
    ],
)
def test_bad_values_name_their_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        OptimizerConfig(**kwargs)


def test_every_key_has_help():
    for cls in (OptimizerConfig, LRSchedulerConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


def test_fsdp2_dtensor_params(tmp_path):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = Tiny()
        fully_shard(model)
        assert isinstance(model.proj.weight, DTensor)
        optimizer = build_optimizer(model, OptimizerConfig())
        assert optimizer.defaults["fused"]
        assert len(optimizer.param_groups[1]["params"]) == 3
        _train(model, optimizer)
        assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()
