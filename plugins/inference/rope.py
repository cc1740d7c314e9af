"""Position → cos/sin tables for the KV-cache forward: the one place RoPE scaling enters.

The table is computed from the model args up to the cache's length, not the training length,
so a model can generate past `max_seq_len` (with the quality its RoPE allows there).

Hook for RoPE scaling: when the args carry `rope_scaling` settings naming a type (e.g.
`{"type": "linear", "factor": 4.0}`), the `rope_scaling` plugin of that name is called as
`plugin(args, length, settings)` and must return the (2, length, head_dim) table.
"""

from collections.abc import Mapping
from typing import Any

import torch

from arbor_titan import registry
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.rope import rope_cos_sin

# HF configs name the scaling in "rope_type" (newer) or "type" (older); "default" means none.
_NAME_KEYS = ("type", "rope_type", "name")


def scaling_name(settings: Mapping[str, Any] | None) -> str | None:
    """The plugin name in RoPE-scaling settings, or None for plain RoPE."""
    if not settings:
        return None
    for key in _NAME_KEYS:
        if key in settings:
            name = settings[key]
            return None if name in (None, "default") else str(name)
    raise ValueError(f"rope_scaling {dict(settings)!r} names no type (one of {_NAME_KEYS})")


def rope_table(args: ArborArgs, length: int) -> torch.Tensor:
    """fp32 cos/sin of shape (2, length, head_dim) for positions 0..length-1 (rotate-half)."""
    scaling = getattr(args, "rope_scaling", None)
    name = scaling_name(scaling)
    if name is None:
        return rope_cos_sin(args.head_dim, length, args.rope_theta)
    table = registry.get("rope_scaling", name)(args, length, dict(scaling))
    expected = (2, length, args.head_dim)
    if tuple(table.shape) != expected:
        raise ValueError(
            f"rope_scaling plugin {name!r} returned a table of shape {tuple(table.shape)}, "
            f"expected {expected}"
        )
    return table.float()
