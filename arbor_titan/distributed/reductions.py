"""Reductions across parallel dimensions that a plain single-process call would get wrong."""

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from arbor_titan.distributed.parallel_dims import ParallelDims


def clip_grad_norm_(
    params: Iterable[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Clip to the global gradient norm over every shard (DTensor) and every pipeline stage."""
    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # sums the squared partial norms of FSDP / TP shards
    if pp_group is not None:
        # Each stage holds different layers: their squared norms add up.
        squared = total**2
        dist.all_reduce(squared, group=pp_group)
        total = squared.sqrt()
    if max_norm > 0 and math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def replicated_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a loss that loss parallel returns as a replicated DTensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def data_parallel_sum(count: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The sum over the data- and context-parallel ranks of a count each rank takes of its own
    tokens (tp and pp ranks hold copies of their replica's, counted once)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count // (dims.tp * dims.pp)
    return count


def mean_over_data_parallel(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The data-parallel mean of a loss that only last-stage ranks hold (others pass 0).

    Summed over the world, each data-parallel replica's loss appears tp times (TP ranks hold
    the same loss), as cp means over equal token shares (their mean is the sequence's mean),
    and non-last pipeline stages add nothing.
    """
    value = replicated_value(value).detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dims.dp * dims.cp * dims.tp
    return value
