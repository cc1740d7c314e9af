"""The narrow protocol the engine needs from a model — a forward with a KV cache — and its
implementation for the Arbor `Transformer`, reusing the model's own modules and weights.

The training forward stays cache-free; this file runs the same blocks step by step:
`prefill` writes one prompt into a cache slot, `decode` advances every slot by one token at its
own position. The two are separate entry points (STYLE lesson 9): decode has fixed shapes and
compiles to one graph; prefill changes length with every prompt and spends its time in large
matmuls that compiling would not speed up, so it runs eager. Decode's matrix products go through
`decode_linear` (see matvec.py: the kernel that reads weights at memory bandwidth on CPU).
"""

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from arbor_titan.models.arbor.model import Attention, FeedForward, Transformer, apply_rope
from plugins.inference.kv_cache import StaticKVCache
from plugins.inference.matvec import decode_linear
from plugins.inference.rope import rope_table

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # F.linear's (x, weight) form


class CachedForward(Protocol):
    """A decoder with `slots` cache slots of `max_len` positions each."""

    slots: int
    max_len: int
    vocab_size: int

    def prefill(self, tokens_s: torch.Tensor, slot: int) -> torch.Tensor:
        """Write positions 0..S-1 of `slot`; return fp32 logits (vocab,) of the last token."""
        ...

    def decode(self, tokens_b: torch.Tensor, positions_b: torch.Tensor) -> torch.Tensor:
        """Feed token b at position b of every slot; return fp32 logits (slots, vocab)."""
        ...


class ArborCachedForward(nn.Module):
    """`CachedForward` for an Arbor `Transformer` (whole model on one device)."""

    def __init__(self, model: Transformer, slots: int, max_len: int):
        super().__init__()
        args = model.args
        dtype, device = model.tok_embeddings.weight.dtype, model.tok_embeddings.weight.device
        self.model = model
        self.slots, self.max_len, self.vocab_size = slots, max_len, args.vocab_size
        kv_shape = (args.n_kv_heads, max_len, args.head_dim)
        self.cache = StaticKVCache(args.n_layers, slots, *kv_shape, dtype=dtype, device=device)
        self.register_buffer("rope", rope_table(args, max_len).to(device), persistent=False)
        self.register_buffer("key_positions", torch.arange(max_len, device=device), False)

    def prefill(self, tokens_s: torch.Tensor, slot: int) -> torch.Tensor:
        seq_len = tokens_s.shape[0]
        if not 0 < seq_len <= self.max_len:
            raise ValueError(f"prompt of {seq_len} tokens does not fit a cache of {self.max_len}")
        step = _Step(self.rope[:, :seq_len], F.linear, slot=slot)
        h_bsd = self._layers(self.model.tok_embeddings(tokens_s[None]), step)
        return self._logits(h_bsd[:, -1], F.linear)[0]

    def decode(self, tokens_b: torch.Tensor, positions_b: torch.Tensor) -> torch.Tensor:
        # Slot b sees its own keys up to its position; later ones are stale or empty.
        mask_b11l = (self.key_positions[None, :] <= positions_b[:, None])[:, None, None, :]
        step = _Step(
            self.rope[:, positions_b], decode_linear, positions_b=positions_b, mask_b11l=mask_b11l
        )
        h_bsd = self._layers(self.model.tok_embeddings(tokens_b[:, None]), step)
        return self._logits(h_bsd[:, 0], decode_linear)

    def _layers(self, h_bsd: torch.Tensor, step: "_Step") -> torch.Tensor:
        for layer, block in enumerate(self.model.layers.values()):
            normed_bsd = block.attention_norm(h_bsd)
            h_bsd = h_bsd + self._attention(block.attention, normed_bsd, layer, step)
            h_bsd = h_bsd + _feed_forward(block.feed_forward, block.ffn_norm(h_bsd), step.linear)
        return h_bsd

    def _attention(
        self, attn: Attention, x_bsd: torch.Tensor, layer: int, step: "_Step"
    ) -> torch.Tensor:
        """Prefill: causal attention within the prompt, whose keys are stored in the slot.
        Decode: one query per slot against that slot's cache up to its position."""
        bsz, seq_len, _ = x_bsd.shape
        linear = step.linear
        q_bshd = linear(x_bsd, attn.wq.weight).view(bsz, seq_len, -1, attn.head_dim)
        k_bshd = linear(x_bsd, attn.wk.weight).view(bsz, seq_len, -1, attn.head_dim)
        v_bshd = linear(x_bsd, attn.wv.weight).view(bsz, seq_len, -1, attn.head_dim)
        q_bshd, k_bshd = _rotate(q_bshd, step.cos_sin), _rotate(k_bshd, step.cos_sin)
        gqa = q_bshd.shape[2] != k_bshd.shape[2]
        if step.slot is not None:
            self.cache.write_prefix(layer, step.slot, k_bshd, v_bshd)
            keys, values, mask, causal = k_bshd.transpose(1, 2), v_bshd.transpose(1, 2), None, True
        else:
            self.cache.write_step(layer, step.positions_b, k_bshd, v_bshd)
            (keys, values), mask, causal = self.cache.layer(layer), step.mask_b11l, False
        out_bhsd = F.scaled_dot_product_attention(
            q_bshd.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa
        )
        return linear(out_bhsd.transpose(1, 2).reshape(bsz, seq_len, -1), attn.wo.weight)

    def _logits(self, h_bd: torch.Tensor, linear: Linear) -> torch.Tensor:
        h_bd = self.model.norm(h_bd)
        output = self.model.output
        weight = output.weight if output is not None else self.model.tok_embeddings.weight
        return linear(h_bd, weight).float()


class _Step(NamedTuple):
    """What one forward call shares across layers: the RoPE rows of its tokens, the matrix
    product to use, and either the prefill's slot or the decode's positions and attention mask."""

    cos_sin: torch.Tensor  # (2, tokens, head_dim), tokens in (batch, seq) order
    linear: Linear
    slot: int | None = None
    positions_b: torch.Tensor | None = None
    mask_b11l: torch.Tensor | None = None


def _feed_forward(ffn: FeedForward, x_bsd: torch.Tensor, linear: Linear) -> torch.Tensor:
    """The model's SwiGLU with its matrix products done by `linear`."""
    hidden = F.silu(linear(x_bsd, ffn.w1.weight)) * linear(x_bsd, ffn.w3.weight)
    return linear(hidden, ffn.w2.weight)


def _rotate(x_bshd: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """RoPE at each token's own position: the model's `apply_rope` over all tokens as one
    sequence, given the table rows of those positions."""
    bsz, seq_len, heads, head_dim = x_bshd.shape
    return apply_rope(x_bshd.reshape(1, bsz * seq_len, heads, head_dim), cos_sin).view_as(x_bshd)
