"""The Arbor decoder: Llama-style pre-norm blocks of GQA attention with RoPE and SwiGLU.

Built on the meta device and materialized with `to_empty()` + `init_weights()`, so a 400B
model is sharded before any of it touches real memory.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.init import init_seeded_, normal, trunc_normal
from arbor_titan.models.arbor.masking import AttentionMask, attention, document_mask
from arbor_titan.models.arbor.rope import apply_rope, rope_cos_sin


class Attention(nn.Module):
    """Grouped-query causal self-attention, optionally within documents (see masking.py)."""

    def __init__(self, args: ArborArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self, x_bsd: torch.Tensor, cos_sin: torch.Tensor, mask: AttentionMask = None
    ) -> torch.Tensor:
        bsz, seq_len, _ = x_bsd.shape
        # -1 heads so a tensor-parallel shard (fewer local heads) needs no special case.
        q_bshd = self.wq(x_bsd).view(bsz, seq_len, -1, self.head_dim)
        k_bshd = self.wk(x_bsd).view(bsz, seq_len, -1, self.head_dim)
        v_bshd = self.wv(x_bsd).view(bsz, seq_len, -1, self.head_dim)
        q_bshd, k_bshd = apply_rope(q_bshd, cos_sin), apply_rope(k_bshd, cos_sin)
        out_bhsd = attention(
            q_bshd.transpose(1, 2), k_bshd.transpose(1, 2), v_bshd.transpose(1, 2), mask
        )
        return self.wo(out_bhsd.transpose(1, 2).reshape(bsz, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x_bsd: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_bsd)) * self.w3(x_bsd))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ArborArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(
        self, x_bsd: torch.Tensor, cos_sin: torch.Tensor, mask: AttentionMask = None
    ) -> torch.Tensor:
        h_bsd = x_bsd + self.attention(self.attention_norm(x_bsd), cos_sin, mask)
        return h_bsd + self.feed_forward(self.ffn_norm(h_bsd))

    def init_weights(self, init_std: float, residual_std: float, seed: int, prefix: str) -> None:
        """`prefix` is the block's name in the model ("layers.3."): each weight's values are
        drawn for (seed, its full name), whatever layout holds it (see init.py)."""
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        # The two residual writers (attention output, FFN down projection) start smaller so the
        # residual stream's variance stays flat with depth (GPT-2's scaled init).
        for name, std in (
            ("attention.wq", init_std),
            ("attention.wk", init_std),
            ("attention.wv", init_std),
            ("attention.wo", residual_std),
            ("feed_forward.w1", init_std),
            ("feed_forward.w3", init_std),
            ("feed_forward.w2", residual_std),
        ):
            weight = self.get_submodule(name).weight
            init_seeded_(weight, trunc_normal(std), seed, f"{prefix}{name}.weight")


class Transformer(nn.Module):
    """Token ids (batch, seq) → logits (batch, seq, vocab).

    Packed documents: `document_ids_bs` (batch, seq) confines attention to each token's own
    document, and `positions_bs` gives each token's RoPE position (default 0..seq-1); see
    masking.py. Pipeline stages receive neither (only the hidden state travels between them).

    Layers live in a ModuleDict keyed by their index so pipeline stages can drop the layers they
    don't own and keep the original names (checkpoints then reshard across stage splits).
    Embedding, final norm and output may be None on pipeline stages that don't hold them.
    """

    def __init__(self, args: ArborArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        # A tied model has no output module: it reads the embedding matrix directly, which
        # survives to_empty(), sharding and checkpoints without any re-tying.
        self.output = (
            None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )
        self.register_buffer(
            "rope_cache",
            rope_table(args),
            persistent=False,
        )

    def forward(
        self,
        tokens_bs: torch.Tensor,
        document_ids_bs: torch.Tensor | None = None,
        positions_bs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h_bsd = self.tok_embeddings(tokens_bs) if self.tok_embeddings is not None else tokens_bs
        # Built once per forward and shared by every layer.
        mask = None if document_ids_bs is None else document_mask(document_ids_bs)
        cos_sin = self.rope_cache if positions_bs is None else self.rope_cache[:, positions_bs]
        for layer in self.layers.values():
            h_bsd = layer(h_bsd, cos_sin, mask)
        if self.norm is not None:
            h_bsd = self.norm(h_bsd)
        if self.output is not None:
            return self.output(h_bsd)
        if self.args.tie_embeddings and self.tok_embeddings is not None:
            return F.linear(h_bsd, self.tok_embeddings.weight)
        return h_bsd

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, seed: int = 0) -> None:
        """Initialize every parameter and recompute the RoPE buffer (lost by `to_empty`).

        A parameter's values depend on `seed` and its name only, so every sharding and
        pipeline split of the model starts from the same weights."""
        args = self.args
        buffer_device = buffer_device or self.rope_cache.device
        self.rope_cache = rope_table(args).to(buffer_device)
        init_std = 0.02
        residual_std = init_std / math.sqrt(2 * args.n_layers)
        if self.tok_embeddings is not None:
            init_seeded_(
                self.tok_embeddings.weight, normal(init_std), seed, "tok_embeddings.weight"
            )
        for key, layer in self.layers.items():
            layer.init_weights(init_std, residual_std, seed, prefix=f"layers.{key}.")
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            init_seeded_(self.output.weight, trunc_normal(init_std), seed, "output.weight")


def rope_table(args: ArborArgs) -> torch.Tensor:
    """The model's cos/sin table: `max_seq_len` positions under the args' RoPE scaling."""
    return rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)


def count_params(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once); works on the meta device."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
