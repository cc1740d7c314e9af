"""Tensor-parallel inference across the processes torchrun starts, for models too big for one
device: each process holds 1/tp of every attention and FFN matrix and of the output projection.

The split is Megatron's: q/k/v and w1/w3 by output rows (each process owns whole heads and a
slice of the FFN), wo and w2 by input columns (their partial products are summed across
processes), the output projection by vocabulary rows (the logits are gathered). Embeddings and
norms are small and stay whole. The weights are DTensors, so a DCP checkpoint of any training
layout loads straight into each process's shard; a whole-weights file is read by every process
and split. `ArborCachedForward` reads the shards and adds the two all-reduces and the gather.
"""

import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Shard, distribute_tensor

from arbor_titan.distributed.init import init_distributed
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.model import Transformer

_BY_ROWS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_BY_COLUMNS = ("attention.wo", "feed_forward.w2")


def tensor_parallel_mesh() -> DeviceMesh | None:
    """A 1-D mesh over every torchrun process, or None in a plain single process."""
    info = init_distributed()
    if info.world_size == 1:
        return None
    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("tp",))


def exit_without_teardown(status: int) -> NoReturn:
    """End a tensor-parallel process (its group already destroyed) without the interpreter's C++
    teardown: after tensor-parallel generation that aborted ("terminate called without an active
    exception") in ~1 of 10 two-process runs, after every Python exit handler had run; plain
    collective loops never did. Nothing is left to clean up by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def check_divisible(args: ArborArgs, tp: int) -> None:
    """Every split must be even: whole heads per process, equal FFN and vocabulary slices."""
    sizes = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "ffn_dim": args.ffn_dim,
        "vocab_size": args.vocab_size,
    }
    uneven = [f"{name}={size}" for name, size in sizes.items() if size % tp]
    if uneven:
        raise ValueError(
            f"tensor parallel over {tp} processes needs {', '.join(sizes)} divisible by {tp}; "
            f"this model has {', '.join(uneven)}"
        )


def shard(model: Transformer, mesh: DeviceMesh) -> None:
    """Replace the split weights by DTensors on `mesh` (on meta before loading: no data moves)."""
    check_divisible(model.args, mesh.size())
    for name, placement in _placements(model).items():
        module = model.get_submodule(name)
        sharded = distribute_tensor(module.weight.detach(), mesh, [placement])
        module.weight = nn.Parameter(sharded, requires_grad=False)


def fill_from_whole(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the model, each process keeping its own slice of split ones."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unknown or missing:
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {unknown}")
    with torch.no_grad():
        for name, whole in state.items():
            param = params[name]
            if isinstance(param, DTensor):
                (placement,) = param.placements
                whole = whole.chunk(param.device_mesh.size(), dim=placement.dim)
                whole = whole[param.device_mesh.get_local_rank()]
            local(param).copy_(whole)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a weight (the tensor itself when it isn't split)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def process_group(model: Transformer) -> dist.ProcessGroup | None:
    """The group the model's weights are split over, or None for a whole model."""
    weight = next(iter(model.layers.values())).attention.wo.weight
    return weight.device_mesh.get_group() if isinstance(weight, DTensor) else None


def _placements(model: Transformer) -> dict[str, Placement]:
    placements = {}
    for layer in model.layers:
        placements |= {f"layers.{layer}.{name}": Shard(0) for name in _BY_ROWS}
        placements |= {f"layers.{layer}.{name}": Shard(1) for name in _BY_COLUMNS}
    if model.output is not None:
        placements["output"] = Shard(0)
    return placements
