"""The narrow protocol the engine needs from a model — a forward with a KV cache — and its
implementation for the Arbor `Transformer`, reusing the model's own modules and weights.

The training forward stays cache-free; this file runs the same blocks step by step:
`prefill` writes one prompt into a cache slot, `decode` advances every slot by one token at its
own position. Both shapes are fixed per call site, so each compiles separately (STYLE lesson 9).
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from arbor_titan.models.arbor.model import Attention, Transformer, TransformerBlock, apply_rope
from plugins.inference.kv_cache import StaticKVCache
from plugins.inference.rope import rope_table


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

    def __init__(
        self,
        model: Transformer,
        slots: int,
        max_len: int,
    ):
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
        positions_bs = self.key_positions[None, :seq_len]
        h_bsd = self.model.tok_embeddings(tokens_s[None])
        for i, block in enumerate(self.model.layers.values()):
            h_bsd = self._block(block, h_bsd, positions_bs, i, slot=slot)
        return self._logits(h_bsd[:, -1])[0]

    def decode(self, tokens_b: torch.Tensor, positions_b: torch.Tensor) -> torch.Tensor:
        h_bsd = self.model.tok_embeddings(tokens_b[:, None])
        for i, block in enumerate(self.model.layers.values()):
            h_bsd = self._block(block, h_bsd, positions_b[:, None], i, slot=None)
        return self._logits(h_bsd[:, 0])

    def _block(
        self,
        block: TransformerBlock,
        x_bsd: torch.Tensor,
        positions_bs: torch.Tensor,
        layer: int,
        slot: int | None,
    ) -> torch.Tensor:
        normed_bsd = block.attention_norm(x_bsd)
        h_bsd = x_bsd + self._attention(block.attention, normed_bsd, positions_bs, layer, slot)
        return h_bsd + block.feed_forward(block.ffn_norm(h_bsd))

    def _attention(
        self,
        attn: Attention,
        x_bsd: torch.Tensor,
        positions_bs: torch.Tensor,
        layer: int,
        slot: int | None,
    ) -> torch.Tensor:
        """Prefill (`slot` given): causal attention within the prompt, keys stored in the slot.
        Decode (`slot` None): one query per slot against that slot's cache up to its position."""
        bsz, seq_len, _ = x_bsd.shape
        q_bshd = self._rotate(attn.wq(x_bsd).view(bsz, seq_len, -1, attn.head_dim), positions_bs)
        k_bshd = self._rotate(attn.wk(x_bsd).view(bsz, seq_len, -1, attn.head_dim), positions_bs)
        v_bshd = attn.wv(x_bsd).view(bsz, seq_len, -1, attn.head_dim)
        gqa = q_bshd.shape[2] != k_bshd.shape[2]
        if slot is not None:
            self.cache.write_prefix(layer, slot, k_bshd, v_bshd)
            out_bhsd = F.scaled_dot_product_attention(
                q_bshd.transpose(1, 2),
                k_bshd.transpose(1, 2),
                v_bshd.transpose(1, 2),
                is_causal=True,
                enable_gqa=gqa,
            )
        else:
            self.cache.write_step(layer, positions_bs[:, 0], k_bshd, v_bshd)
            keys_bhld, values_bhld = self.cache.layer(layer)
            # Slot b sees its own keys up to its position; later ones are stale or empty.
            mask_b11l = (self.key_positions[None, :] <= positions_bs)[:, None, None, :]
            out_bhsd = F.scaled_dot_product_attention(
                q_bshd.transpose(1, 2), keys_bhld, values_bhld, attn_mask=mask_b11l, enable_gqa=gqa
            )
        return attn.wo(out_bhsd.transpose(1, 2).reshape(bsz, seq_len, -1))

    def _rotate(self, x_bshd: torch.Tensor, positions_bs: torch.Tensor) -> torch.Tensor:
        """RoPE at each token's own position: the model's `apply_rope` over all tokens as one
        sequence, with the table's rows gathered at those positions."""
        bsz, seq_len, heads, head_dim = x_bshd.shape
        flat_1thd = x_bshd.reshape(1, bsz * seq_len, heads, head_dim)
        return apply_rope(flat_1thd, self.rope[:, positions_bs.reshape(-1)]).view_as(x_bshd)

    def _logits(self, h_bd: torch.Tensor) -> torch.Tensor:
        h_bd = self.model.norm(h_bd)
        output = self.model.output
        weight = output.weight if output is not None else self.model.tok_embeddings.weight
        return F.linear(h_bd, weight).float()
