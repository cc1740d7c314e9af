"""The narrow protocol the engine needs from a model — a forward with a KV cache — and its
implementation for the Arbor `Transformer`, reusing the model's own modules and weights.

The training forward stays cache-free; this file runs the same blocks step by step:
`prefill` writes one prompt into a cache slot, `decode` advances the live slots by one token each
at its own position. The two are separate entry points (STYLE lesson 9): decode has fixed shapes and
compiles to one graph; prefill changes length with every prompt and spends its time in large
matmuls that compiling would not speed up, so it runs eager. Decode's matrix products go through
`DecodeMatrix` (see matvec.py: the kernels that read weights at memory bandwidth on CPU).
"""

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from arbor_titan.models.arbor.model import Transformer, TransformerBlock
from arbor_titan.models.arbor.rope import apply_rope
from plugins.inference.kv_cache import BLOCK_SIZE, PagedKVCache
from plugins.inference.matvec import DecodeMatrix
from plugins.inference.rope import rope_table
from plugins.inference.tensor_parallel import local, process_group


class CachedForward(Protocol):
    """A decoder with `slots` sequence slots of up to `max_len` positions each, whose KV memory
    a slot is given by `assign` and gives back by `release`."""

    slots: int
    max_len: int
    vocab_size: int

    def assign(self, slot: int, prompt: Sequence[int], positions: int) -> int | None:
        """Room for `positions` positions of a sequence starting with `prompt` in `slot`: how
        many leading prompt positions are cached already (shared with earlier prompts), or None
        when there is no room now (the request should wait)."""
        ...

    def can_hold(self, positions: int) -> bool:
        """Whether one sequence of `positions` positions fits the whole cache at all."""
        ...

    def release(self, slot: int) -> None: ...

    def prefill(self, tokens_s: torch.Tensor, slot: int, start: int = 0) -> torch.Tensor:
        """Write positions `start`..S-1 of `slot` (those before are cached: see `assign`);
        return fp32 logits (vocab,) of the last token."""
        ...

    def decode(
        self,
        slots_b: torch.Tensor,
        tokens_b: torch.Tensor,
        positions_b: torch.Tensor,
        keys_len: int | None = None,
    ) -> torch.Tensor:
        """Feed token b at position b of slot `slots_b[b]`, for the live sequences only; return
        fp32 logits (rows, vocab). Attention reads the first `keys_len` cache positions (default:
        all), which must cover every row's position. Rows repeating an earlier row (padding to
        a batch size compiled for) write the same key to the same place."""
        ...


class ArborCachedForward(nn.Module):
    """`CachedForward` for an Arbor `Transformer`, whole on one device or split across
    processes by `tensor_parallel.shard` (then each process runs its own heads and FFN slice,
    the partial sums meet in an all-reduce and the vocabulary slices in a gather).

    Each layer's q/k/v projections and SwiGLU input projections are fused into one matrix each,
    so a decode step makes 4 matrix products per layer instead of 7 (bigger reads run closer to
    bandwidth and per-call overhead halves). The model's own `wq`/`wk`/`wv`/`w1`/`w3` weights
    become row views of the fused matrices: same values, no second copy. `pack_weights`: see
    matvec.py (bf16/fp16 on CPU: a second, faster copy for decode).
    """

    def __init__(
        self,
        model: Transformer,
        slots: int,
        max_len: int,
        pack_weights: bool = True,
        kv_blocks: int | None = None,
    ):
        super().__init__()
        args = model.args
        dtype, device = model.tok_embeddings.weight.dtype, model.tok_embeddings.weight.device
        self.model = model
        self.slots, self.max_len, self.vocab_size = slots, max_len, args.vocab_size
        self.head_dim = args.head_dim
        self.group = process_group(model)
        self.fused = nn.ModuleList(
            _FusedLayer(block, pack_weights) for block in model.layers.values()
        )
        tied = model.output is None  # then the embedding, whole in every process
        output = model.tok_embeddings.weight if tied else local(model.output.weight)
        self.output = DecodeMatrix(output, pack_weights)
        self.vocab_split = not tied and self.group is not None
        kv_heads = self.fused[0].qkv_sizes[1] // args.head_dim  # this process's share
        kv_blocks = kv_blocks or slots * math.ceil(max_len / BLOCK_SIZE)  # a static cache's room
        kv_shape = (kv_heads, max_len, args.head_dim, kv_blocks)
        self.cache = PagedKVCache(args.n_layers, slots, *kv_shape, dtype=dtype, device=device)
        self.register_buffer("rope", rope_table(args, max_len).to(device), persistent=False)
        positions = self.cache.tables.shape[1] * BLOCK_SIZE  # every position a table reaches
        self.register_buffer("key_positions", torch.arange(positions, device=device), False)

    def assign(self, slot: int, prompt: Sequence[int], positions: int) -> int | None:
        return self.cache.assign(slot, prompt, positions)

    def can_hold(self, positions: int) -> bool:
        return self.cache.blocks_for(positions) <= self.cache.pool.num_blocks

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def prefill(self, tokens_s: torch.Tensor, slot: int, start: int = 0) -> torch.Tensor:
        seq_len = tokens_s.shape[0]
        if not 0 <= start < seq_len <= self.max_len:
            raise ValueError(
                f"prompt of {seq_len} tokens from {start} does not fit a cache of {self.max_len}"
            )
        if not self.cache.holds(slot):
            raise ValueError(f"slot {slot} has no KV blocks: assign() it first")
        positions_1s = self.key_positions[start:seq_len][None]
        # Past a cached prefix, the new positions attend to it as well: their keys are read
        # back from the cache under a causal mask offset by `start`.
        keys_read = self.key_positions[: self.cache.read_len(seq_len)]
        mask_11qk = (keys_read <= positions_1s[..., None])[:, None] if start else None
        step = _Step(
            self.rope[:, start:seq_len],
            decoding=False,
            slots_b=torch.tensor([slot], device=tokens_s.device),
            positions_bs=positions_1s,
            mask_bqk=mask_11qk,
            keys_len=seq_len,
        )
        h_bsd = self._layers(self.model.tok_embeddings(tokens_s[None, start:]), step)
        self.cache.publish_prompt(slot, tokens_s.tolist())
        return self._logits(h_bsd[:, -1], step)[0]

    def decode(
        self,
        slots_b: torch.Tensor,
        tokens_b: torch.Tensor,
        positions_b: torch.Tensor,
        keys_len: int | None = None,
    ) -> torch.Tensor:
        keys_len = self.max_len if keys_len is None else keys_len
        # Row b sees its slot's keys up to its position; later ones are stale or another's.
        key_positions = self.key_positions.narrow(0, 0, self.cache.read_len(keys_len))
        mask_b11l = (key_positions[None, :] <= positions_b[:, None])[:, None, None, :]
        step = _Step(
            self.rope[:, positions_b],
            decoding=True,
            slots_b=slots_b,
            positions_bs=positions_b[:, None],
            mask_bqk=mask_b11l,
            keys_len=keys_len,
        )
        h_bsd = self._layers(self.model.tok_embeddings(tokens_b[:, None]), step)
        return self._logits(h_bsd[:, 0], step)

    def _layers(self, h_bsd: torch.Tensor, step: "_Step") -> torch.Tensor:
        for layer, (block, fused) in enumerate(zip(self.model.layers.values(), self.fused)):
            normed_bsd = block.attention_norm(h_bsd)
            h_bsd = h_bsd + self._sum(self._attention(fused, normed_bsd, layer, step))
            h_bsd = h_bsd + self._sum(fused.feed_forward(block.ffn_norm(h_bsd), step.decoding))
        return h_bsd

    def _sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The products of column-split matrices, summed over the processes (dynamo traces the
        in-place collective as a functional one)."""
        if self.group is not None:
            dist.all_reduce(partial, group=self.group)
        return partial

    def _attention(
        self, fused: "_FusedLayer", x_bsd: torch.Tensor, layer: int, step: "_Step"
    ) -> torch.Tensor:
        """Prefill: causal attention within the prompt, whose keys are stored in the slot (and
        past a cached prefix, to it). Decode: one query per row against its slot's cache up to
        its position."""
        bsz, seq_len, _ = x_bsd.shape
        q_size, k_size, v_size = fused.qkv_sizes
        qk, v = fused.qkv(x_bsd, step.decoding).split([q_size + k_size, v_size], dim=-1)
        # Queries and keys side by side are heads of one tensor: one RoPE call rotates both.
        qk_bshd = _rotate(qk.view(bsz, seq_len, -1, self.head_dim), step.cos_sin)
        q_bshd, k_bshd = qk_bshd.split([q_size // self.head_dim, k_size // self.head_dim], dim=2)
        v_bshd = v.view(bsz, seq_len, -1, self.head_dim)
        gqa = q_bshd.shape[2] != k_bshd.shape[2]
        self.cache.write(layer, step.slots_b, step.positions_bs, k_bshd, v_bshd)
        if step.mask_bqk is None:  # a whole prompt: its own keys, causal
            keys, values, mask, causal = k_bshd.transpose(1, 2), v_bshd.transpose(1, 2), None, True
        else:
            keys, values = self.cache.read(layer, step.slots_b, step.keys_len)
            mask, causal = step.mask_bqk, False
        out_bhsd = F.scaled_dot_product_attention(
            q_bshd.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa
        )
        return fused.wo(out_bhsd.transpose(1, 2).reshape(bsz, seq_len, -1), step.decoding)

    def _logits(self, h_bd: torch.Tensor, step: "_Step") -> torch.Tensor:
        logits_bv = self.output(self.model.norm(h_bd), step.decoding)
        if self.vocab_split:  # each process has a slice of the vocabulary
            local_vb = logits_bv.t().contiguous()
            slices_vb = local_vb.new_empty(self.vocab_size, local_vb.shape[1])
            dist.all_gather_into_tensor(slices_vb, local_vb, group=self.group)
            logits_bv = slices_vb.t()
        return logits_bv.float()


class _FusedLayer(nn.Module):
    """One block's weights as the cached forward multiplies them (this process's part under
    tensor parallelism). Buffers, so compiled graphs treat their shapes as fixed."""

    def __init__(self, block: TransformerBlock, pack_weights: bool):
        super().__init__()
        attn, ffn = block.attention, block.feed_forward
        self.qkv_sizes = tuple(local(w.weight).shape[0] for w in (attn.wq, attn.wk, attn.wv))
        self.qkv = DecodeMatrix(_stack_rows(attn.wq, attn.wk, attn.wv), pack_weights)
        self.wo = DecodeMatrix(local(attn.wo.weight), pack_weights)
        self.w13 = DecodeMatrix(_stack_rows(ffn.w1, ffn.w3), pack_weights)
        self.w2 = DecodeMatrix(local(ffn.w2.weight), pack_weights)

    def feed_forward(self, x_bsd: torch.Tensor, decoding: bool) -> torch.Tensor:
        """The model's SwiGLU, w2(silu(w1 x) * w3 x), with one product for w1 and w3."""
        gate, up = self.w13(x_bsd, decoding).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up, decoding)


def _stack_rows(*linears: nn.Linear) -> torch.Tensor:
    """The linears' weights (this process's rows of them) as one matrix; each weight becomes a
    view of its rows in it."""
    with torch.no_grad():
        weights = [local(linear.weight) for linear in linears]
        stacked = torch.cat(weights)
        start = 0
        for weight in weights:
            rows = weight.shape[0]
            weight.data = stacked[start : start + rows]
            start += rows
    return stacked


class _Step(NamedTuple):
    """What one forward call shares across layers: the RoPE rows of its tokens, whether it
    decodes, each row's slot and positions, and the attention mask over the keys read back from
    the cache (None: a whole prompt attends causally to itself)."""

    cos_sin: torch.Tensor  # (2, tokens, head_dim), tokens in (batch, seq) order
    decoding: bool
    slots_b: torch.Tensor
    positions_bs: torch.Tensor
    mask_bqk: torch.Tensor | None  # (rows, 1, queries, keys read)
    keys_len: int


def _rotate(x_bshd: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """RoPE at each token's own position: the model's `apply_rope` over all tokens as one
    sequence, given the table rows of those positions."""
    bsz, seq_len, heads, head_dim = x_bshd.shape
    return apply_rope(x_bshd.reshape(1, bsz * seq_len, heads, head_dim), cos_sin).view_as(x_bshd)
