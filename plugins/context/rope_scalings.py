"""The built-in RoPE scalings: `linear`, `ntk`, `dynamic_ntk`, `yarn` and `llama3`.

Each turns the plain frequencies θ_i = theta^(-2i/d) of a model trained at `original_max_seq_len`
positions into frequencies meant for `factor` times that many. The variants are the ones
`transformers` implements (`modeling_rope_utils`), which is what Hugging Face checkpoints were
trained with and what the HF export writes: tests/plugins/context/test_rope_scalings.py compares
every scaling with it.
"""

import math
from dataclasses import dataclass

import torch

from arbor_titan.config.fields import REQUIRED, option
from arbor_titan.models.arbor.rope import RopeScaling, plain_inv_freq
from arbor_titan.registry import register


@dataclass
class FactorParams:
    factor: float = option(
        REQUIRED, "Context extension ratio s = new length / trained length (1 = plain RoPE).", ge=1
    )


@dataclass
class ExtensionParams(FactorParams):
    original_max_seq_len: int = option(
        REQUIRED, "Sequence length the model was trained at before this extension.", ge=1
    )


@dataclass
class YarnParams(ExtensionParams):
    beta_fast: float = option(
        32.0, "Dimensions turning more than this often in the original length keep θ_i.", gt=0
    )
    beta_slow: float = option(
        1.0, "Dimensions turning less than this often are interpolated (θ_i / s).", gt=0
    )
    attention_factor: float | None = option(
        None, "Multiplies cos and sin; unset: 0.1·ln(s) + 1, or from mscale/mscale_all_dim.", gt=0
    )
    mscale: float | None = option(
        None, "DeepSeek's attention factor numerator scale (with mscale_all_dim).", gt=0
    )
    mscale_all_dim: float | None = option(
        None, "DeepSeek's attention factor denominator scale (with mscale).", gt=0
    )
    truncate: bool = option(True, "Round the ramp's ends to whole dimensions (floor/ceil).")

    def __post_init__(self) -> None:
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})"
            )
        if (self.mscale is None) != (self.mscale_all_dim is None):
            raise ValueError("mscale and mscale_all_dim are used together: set both or neither")
        if self.attention_factor is not None and self.mscale is not None:
            raise ValueError(
                "attention_factor replaces the one mscale/mscale_all_dim give: not both"
            )


@dataclass
class Llama3Params(ExtensionParams):
    # Llama 3.1's values (with factor 8 and original_max_seq_len 8192).
    low_freq_factor: float = option(
        1.0, "Wavelengths above original_max_seq_len / this are interpolated (θ_i / s).", gt=0
    )
    high_freq_factor: float = option(
        4.0, "Wavelengths below original_max_seq_len / this keep θ_i.", gt=0
    )

    def __post_init__(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                f"({self.low_freq_factor})"
            )


def ntk_theta(theta: float, head_dim: int, ratio: float) -> float:
    """NTK-aware base b·r^(d/(d−2)): the lowest frequency slows by exactly r, the highest keeps
    its speed, those between by a geometric blend."""
    return theta * ratio ** (head_dim / (head_dim - 2))


@register("rope_scaling", "linear")
class LinearScaling(RopeScaling):
    """Position interpolation (Chen et al. 2023, arXiv 2306.15595): every θ_i / s, so position
    s·p rotates as p did in training."""

    Params = FactorParams

    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        return plain_inv_freq(head_dim, theta) / self.params.factor


@register("rope_scaling", "ntk")
class NtkScaling(RopeScaling):
    """NTK-aware scaling (bloc97, 2023): a larger base instead of interpolation, so the fast
    dimensions that tell neighbouring tokens apart keep their resolution."""

    Params = FactorParams

    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        return plain_inv_freq(head_dim, ntk_theta(theta, head_dim, self.params.factor))


@register("rope_scaling", "dynamic_ntk")
class DynamicNtkScaling(RopeScaling):
    """Dynamic NTK (emozilla, 2023), for inference: plain RoPE up to `original_max_seq_len` (L);
    a table of ℓ > L positions gets the NTK base for the ratio s·ℓ/L − (s − 1), which grows with
    the length the table has to reach. Whoever builds the table picks ℓ (the inference engine: its
    KV cache's length)."""

    Params = ExtensionParams

    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        factor, original = self.params.factor, self.params.original_max_seq_len
        ratio = factor * max(length, original) / original - (factor - 1)
        return plain_inv_freq(head_dim, ntk_theta(theta, head_dim, ratio))


def yarn_mscale(factor: float, scale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1·ln(s) + 1 (Peng et al. 2023, arXiv 2309.00071 §3.4,
    fitted on LLaMA), its slope scaled by DeepSeek's `mscale`."""
    return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0


@register("rope_scaling", "yarn")
class YarnScaling(RopeScaling):
    """YaRN (arXiv 2309.00071): dimensions that turn often within the original length keep θ_i,
    those that turn less than once are interpolated (θ_i / s), a linear ramp in between; and
    cos and sin are multiplied by an attention factor that sharpens the softmax again."""

    Params = YarnParams

    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        plain = plain_inv_freq(head_dim, theta)
        low, high = self.ramp_ends(head_dim, theta)
        pairs = torch.arange(head_dim // 2, dtype=torch.float64)
        interpolated = ((pairs - low) / (high - low)).clamp(0, 1)
        return plain * (1 - interpolated) + plain / self.params.factor * interpolated

    def ramp_ends(self, head_dim: int, theta: float) -> tuple[float, float]:
        """The (fractional) pair indices where the dimensions turn beta_fast and beta_slow times
        within the original length; clipped to [0, head_dim − 1] as transformers does."""
        p = self.params

        def pair_turning(times: float) -> float:
            wavelength = p.original_max_seq_len / times
            return head_dim * math.log(wavelength / (2 * math.pi)) / (2 * math.log(theta))

        low, high = pair_turning(p.beta_fast), pair_turning(p.beta_slow)
        if p.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:  # both clipped to one end: a step, not a division by zero
            high += 0.001
        return low, high

    def attention_factor(self, head_dim: int, theta: float) -> float:
        p = self.params
        if p.attention_factor is not None:
            return p.attention_factor
        if p.mscale is not None:
            return yarn_mscale(p.factor, p.mscale) / yarn_mscale(p.factor, p.mscale_all_dim)
        return yarn_mscale(p.factor)


@register("rope_scaling", "llama3")
class Llama3Scaling(RopeScaling):
    """Llama 3.1's scaling: wavelengths shorter than original/high_freq_factor keep θ_i, longer
    than original/low_freq_factor are interpolated (θ_i / s), and between the two a smooth blend
    linear in original/wavelength. No attention factor."""

    Params = Llama3Params

    def inv_freq(self, head_dim: int, theta: float, length: int) -> torch.Tensor:
        p = self.params
        plain = plain_inv_freq(head_dim, theta)
        turns = p.original_max_seq_len * plain / (2 * math.pi)  # original length / wavelength
        kept = (turns - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)
        kept = kept.clamp(0, 1)
        return plain * kept + plain / p.factor * (1 - kept)
