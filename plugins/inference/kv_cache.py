"""A static KV cache: per layer, keys and values of shape (slots, n_kv_heads, max_len, head_dim).

Allocated once with fixed shapes, so the decode step never reallocates and compiles to one
graph (gpt-fast's design). It stores the kv heads only: with grouped-query attention each kv head
serves a group of query heads, and SDPA's `enable_gqa` expands them on the fly.
"""

import torch
from torch import nn


class StaticKVCache(nn.Module):
    """Keys/values for `slots` sequences of up to `max_len` positions in each of `n_layers`."""

    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        if slots <= 0 or max_len <= 0:
            raise ValueError(f"KV cache needs slots > 0 and max_len > 0, got {slots}, {max_len}")
        self.n_layers, self.slots, self.max_len = n_layers, slots, max_len
        shape = (slots, n_kv_heads, max_len, head_dim)
        for i in range(n_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype, device=device), False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype, device=device), False)
        self.register_buffer("slot_ids", torch.arange(slots, device=device), persistent=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's whole key and value buffers (no copy)."""
        return getattr(self, f"k_{i}"), getattr(self, f"v_{i}")

    def write_prefix(self, i: int, slot: int, k_bshd: torch.Tensor, v_bshd: torch.Tensor) -> None:
        """Store one sequence's positions 0..S-1 (batch of 1) in `slot`."""
        keys, values = self.layer(i)
        seq_len = k_bshd.shape[1]
        keys[slot, :, :seq_len] = k_bshd[0].transpose(0, 1)
        values[slot, :, :seq_len] = v_bshd[0].transpose(0, 1)

    def write_step(
        self, i: int, positions_b: torch.Tensor, k_b1hd: torch.Tensor, v_b1hd: torch.Tensor
    ) -> None:
        """Store one new position per slot: slot b's key goes to position `positions_b[b]`."""
        keys, values = self.layer(i)
        keys[self.slot_ids, :, positions_b] = k_b1hd[:, 0]
        values[self.slot_ids, :, positions_b] = v_b1hd[:, 0]

    @property
    def nbytes(self) -> int:
        keys, values = self.layer(0)
        return self.n_layers * (keys.nbytes + values.nbytes)
