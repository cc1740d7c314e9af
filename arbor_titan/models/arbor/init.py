"""Layout-independent random values: a tensor's numbers are a function of a seed and its name.

Drawing from the global RNG makes a parameter's values depend on what was drawn before it —
which layers this pipeline rank holds, how FSDP2 and TP shard them — so the same seed would
start a 1-GPU and an 8-GPU run from different weights. Here every parameter has its own CPU
generator, seeded by a stable hash of (seed, name), and its full tensor is drawn before this
rank keeps its shard: any layout, any device, the same starting weights.
"""

import zlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Fills a float32 CPU tensor in place from the generator.
Fill = Callable[[torch.Tensor, torch.Generator], object]


def named_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `key` (Python's `hash` of a str is salted
    per process, so it would differ between ranks and runs)."""
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, key)).encode()))


def normal(std: float) -> Fill:
    return lambda t, generator: nn.init.normal_(t, std=std, generator=generator)


def trunc_normal(std: float) -> Fill:
    """Normal of `std` truncated at ±3 std."""
    return lambda t, generator: nn.init.trunc_normal_(
        t, std=std, a=-3 * std, b=3 * std, generator=generator
    )


@torch.no_grad()
def init_seeded_(param: torch.Tensor, fill: Fill, seed: int, name: str) -> None:
    """Fill `param` (plain or a DTensor shard) with the values `fill` draws for (seed, name).

    The whole tensor is drawn, one parameter at a time, so this costs the full parameter's
    numbers on every rank that holds a piece of it; that buys exact agreement between layouts.
    """
    full = torch.empty(param.shape, dtype=torch.float32)
    fill(full, named_generator("init", seed, name))
    if isinstance(param, DTensor):
        # src_data_rank=None: each rank cuts its own shard from its own copy, no communication.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
