"""Rotary position embeddings: the inverse frequencies, their scalings, and the cos/sin tables.

A scaling (position interpolation, NTK, YaRN, Llama 3, ...) is a `rope_scaling` plugin that
turns the plain frequencies θ_i = theta^(-2i/d) into scaled ones and may multiply cos and sin by an
attention factor. Model args carry the scaling as plain settings, `{"type": "yarn", "factor": 4.0,
...}`, so `model_args.json`, checkpoints and the HF export record it; everything that builds a
table (training, inference, evaluation) goes through `rope_cos_sin`.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from arbor_titan import registry
from arbor_titan.config.loader import ConfigError
from arbor_titan.config.params import parse_params


@dataclass
class NoRopeParams:
    """For scalings without parameters."""


class RopeScaling(ABC):
    """Subclass, set `Params` (a dataclass: its fields are the scaling's keys), implement
    `inv_freq`, and register with `@register("rope_scaling", "name")`."""

    Params: ClassVar[type] = NoRopeParams

    def __init__(self, params: Any):
        self.params = params

    @abstractmethod
    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        """float64 inverse frequencies, shape (head_dim // 2,), for a table of `length` positions
        (only length-dependent scalings such as dynamic NTK read `length`)."""

    def attention_factor(self, head_dim: int, theta: float) -> float:
        """Multiplies cos and sin (so attention logits scale by its square); 1 for most."""
        return 1.0


def plain_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """θ_i = theta^(-2i/d) in float64, the unscaled RoPE frequencies."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def scaling_name(settings: Mapping[str, Any] | None) -> str | None:
    """The plugin name in scaling settings; None for plain RoPE (no settings, or type "default")."""
    if not settings:
        return None
    if "type" not in settings:
        raise ConfigError(f"rope scaling {dict(settings)!r} has no 'type' naming the scaling")
    name = settings["type"]
    return None if name in (None, "", "default") else str(name)


def build_rope_scaling(
    settings: Mapping[str, Any] | None, where: str = "rope_scaling"
) -> RopeScaling | None:
    """The scaling that `settings` names, its params checked; None for plain RoPE. Errors name
    `where` (the TOML key the settings came from) and the registered scalings."""
    name = scaling_name(settings)
    if name is None:
        return None
    try:
        cls = registry.get("rope_scaling", name)
    except registry.PluginError as err:
        raise ConfigError(f"{where}.type: {err}") from None
    raw = {key: value for key, value in settings.items() if key != "type"}
    return cls(parse_params(cls.Params, raw, where, name))


def check_rope_scaling(settings: Mapping[str, Any] | None, where: str = "rope_scaling") -> None:
    """Raise ConfigError now for settings that `rope_cos_sin` would reject later."""
    build_rope_scaling(settings, where)


def rope_frequencies(
    head_dim: int, length: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, float]:
    """float64 inverse frequencies (head_dim // 2,) and the attention factor of a scaling, for
    a model of `length` positions (only length-dependent scalings read it)."""
    plugin = build_rope_scaling(scaling)
    if plugin is None:
        return plain_inv_freq(head_dim, theta), 1.0
    inv_freq = plugin.inv_freq(head_dim, theta, length).to(torch.float64)
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(
            f"rope_scaling {scaling_name(scaling)!r} returned inverse frequencies of shape "
            f"{tuple(inv_freq.shape)}, expected ({head_dim // 2},)"
        )
    return inv_freq, plugin.attention_factor(head_dim, theta)


def rope_cos_sin_at(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """fp32 cos/sin of shape (2, *positions.shape, head_dim) for just these positions: memory
    grows with the tokens held, not with the longest length the model supports. The angles are
    float64 so positions in the millions keep fp32-exact tables."""
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float64)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return (torch.stack([angles.cos(), angles.sin()]) * factor).float()


def rope_cos_sin(
    head_dim: int, length: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """fp32 cos/sin tables of shape (2, length, head_dim) stacked on dim 0, rotate-half layout.

    The rotate-half layout (the first half of each head pairs with the second) is the one
    Hugging Face Llama checkpoints use, so weights move between the two without permutation.
    """
    inv_freq, factor = rope_frequencies(head_dim, length, theta, scaling)
    return rope_cos_sin_at(torch.arange(length), inv_freq, factor)


def apply_rope(x_bshd: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` by the table's first seq_len positions; a table of shape (2, batch, seq,
    head_dim) holds each token's own position (e.g. restarting at every document)."""
    seq_len = x_bshd.shape[1]
    if cos_sin.dim() == 4:
        cos_sd, sin_sd = cos_sin[0, :, :, None, :], cos_sin[1, :, :, None, :]
    else:
        cos_sd, sin_sd = cos_sin[0, :seq_len, None, :], cos_sin[1, :seq_len, None, :]
    x1, x2 = x_bshd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_bshd * cos_sd + rotated * sin_sd).to(x_bshd.dtype)
