"""How a grown tensor's entries are filled, so one operator body grows weights, Adam moments and
the old/new mask alike.

An operator never writes numbers itself: it says which entries are old (`old`, `scaled`), which
copy an old tensor into a new place (`copy`), which are new (`fresh`) and where symmetry-breaking
noise goes (`noise`). Each `Values` subclass turns those words into numbers for one kind of
tensor. The rule for optimizer moments follows the gradient: an entry whose gradient provably
equals an old gradient times `grad_scale` (cloned or split units, rescaled gains) carries the old
moment times `grad_scale**power`; every other new entry starts at zero.
"""

import math
from abc import ABC, abstractmethod

import torch

from arbor_titan.models.arbor.init import named_generator

READ, WRITE, GAIN = "read", "write", "gain"
ROLES = (READ, WRITE, GAIN)

# The model's own init std (`Transformer.init_weights`), used for new reader entries when the
# tensor they extend has no spread to copy (a single entry, or all zeros).
FALLBACK_STD = 0.02

Scale = float | torch.Tensor


class Values(ABC):
    """The fill rules an operator's `grow` calls; see the module docstring."""

    def old(self, t: torch.Tensor) -> torch.Tensor:
        """Entries that stay as they were."""
        return t

    @abstractmethod
    def scaled(self, t: torch.Tensor, weight_scale: Scale, grad_scale: Scale) -> torch.Tensor:
        """Old entries whose weights are multiplied by `weight_scale` and whose gradients, in the
        grown model, equal the old gradients times `grad_scale` (scales broadcast against t)."""

    @abstractmethod
    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A new tensor initialized from old weights (deepen, stack): its moments start at zero."""

    @abstractmethod
    def fresh(self, shape: tuple[int, ...], like: torch.Tensor, role: str) -> torch.Tensor:
        """New entries: random readers (`like`'s std), zero writers, unit gains."""

    @abstractmethod
    def noise(self, like: torch.Tensor, groups: torch.Tensor, snr_db: float) -> torch.Tensor:
        """Noise to add to `like` that sums to zero over each group of its last-dim columns.

        `groups[c]` names the group of column c. Columns of one group read identical inputs
        (clones), so the noise cancels in the forward pass while the copies' gradients differ.
        """


class WeightValues(Values):
    """Parameters. Random entries come from a generator seeded by (seed, tensor name), so the
    result does not depend on the order tensors are grown in or on which rank grows them."""

    def __init__(self, seed: int, name: str):
        self.generator = named_generator(seed, name)

    def scaled(self, t: torch.Tensor, weight_scale: Scale, grad_scale: Scale) -> torch.Tensor:
        return t * weight_scale

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def fresh(self, shape: tuple[int, ...], like: torch.Tensor, role: str) -> torch.Tensor:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if role == WRITE:
            return like.new_zeros(shape)
        if role == GAIN:
            return like.new_ones(shape)
        return self._randn(shape, like) * _std(like)

    def noise(self, like: torch.Tensor, groups: torch.Tensor, snr_db: float) -> torch.Tensor:
        if like.is_meta:
            return torch.empty_like(like)
        groups = groups.cpu()
        z = torch.randn(like.shape, generator=self.generator, dtype=_work_dtype(like))
        n_groups = int(groups.max()) + 1
        sums = z.new_zeros((*like.shape[:-1], n_groups)).index_add_(-1, groups, z)
        counts = torch.bincount(groups, minlength=n_groups).to(z.dtype)
        z = z - (sums / counts)[..., groups]
        spread = float(z.std()) if z.numel() > 1 else 0.0
        if spread == 0.0:  # every group a single column: nothing to break
            return torch.zeros_like(like)
        # SNR in dB of the signal's std over the noise's std: 10 dB is noise at 0.32x the signal.
        target = _std(like) / 10 ** (snr_db / 20)
        return (z * (target / spread)).to(like.device, like.dtype)

    def _randn(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if like.is_meta:
            return torch.empty(shape, dtype=like.dtype, device="meta")
        z = torch.randn(shape, generator=self.generator, dtype=_work_dtype(like))
        return z.to(like.device, like.dtype)


class _NewEntriesZero(Values):
    """Values whose new entries, copies and noise all start at zero (optimizer state, masks)."""

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def fresh(self, shape: tuple[int, ...], like: torch.Tensor, role: str) -> torch.Tensor:
        return like.new_zeros(shape)

    def noise(self, like: torch.Tensor, groups: torch.Tensor, snr_db: float) -> torch.Tensor:
        return torch.zeros_like(like)


class MomentValues(_NewEntriesZero):
    """Adam moments: `power` 1 for exp_avg, 2 for exp_avg_sq."""

    def __init__(self, power: int):
        self.power = power

    def scaled(self, t: torch.Tensor, weight_scale: Scale, grad_scale: Scale) -> torch.Tensor:
        return t * grad_scale**self.power


class AgeValues(_NewEntriesZero):
    """Grows a tensor of `True` into the mask of carried entries (False where entries are new)."""

    def scaled(self, t: torch.Tensor, weight_scale: Scale, grad_scale: Scale) -> torch.Tensor:
        return t


def _work_dtype(like: torch.Tensor) -> torch.dtype:
    """Random numbers are drawn on the CPU (one generator for every device) in float32, or in
    float64 for float64 tensors so that zero-sum noise cancels to float64 rounding."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _std(like: torch.Tensor) -> float:
    if like.is_meta or like.numel() < 2:
        return FALLBACK_STD
    std = float(like.to(_work_dtype(like)).std())
    return std if std > 0 and math.isfinite(std) else FALLBACK_STD
