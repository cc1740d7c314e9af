"""The Arbor decoder: Llama-style pre-norm blocks of GQA attention with RoPE and SwiGLU.

Built on the meta device and materialized with `to_empty()` + `init_weights()`, so a 400B
model is sharded before any of it touches real memory.
"""

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.init import init_seeded_, normal, trunc_normal
from arbor_titan.models.arbor.masking import AttentionMask, attention, document_mask
from arbor_titan.models.arbor.rope import apply_rope, rope_cos_sin_at, rope_frequencies

if TYPE_CHECKING:
    from arbor_titan.distributed.context_parallel import ContextParallel
    from arbor_titan.models.arbor.loss import ChunkedLoss
    from arbor_titan.models.arbor.parallelize import ReplicatedKV


class Attention(nn.Module):
    """Grouped-query causal self-attention, optionally within documents (see masking.py).

    Under context parallelism (`context_parallel` set by parallelize) the local queries attend
    over the keys and values of the whole sequence, gathered from the cp group. When tensor
    parallel ranks can't split the kv heads (`replicated_kv` set by parallelize), each rank
    projects the kv heads its query heads read from replicated wk/wv (see parallelize.py)."""

    context_parallel: "ContextParallel | None" = None
    replicated_kv: "ReplicatedKV | None" = None

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
        if self.replicated_kv is None:
            k_bshd = self.wk(x_bsd).view(bsz, seq_len, -1, self.head_dim)
            v_bshd = self.wv(x_bsd).view(bsz, seq_len, -1, self.head_dim)
        else:
            k_bshd, v_bshd = self.replicated_kv(x_bsd, self.wk.weight, self.wv.weight)
        q_bshd, k_bshd = apply_rope(q_bshd, cos_sin), apply_rope(k_bshd, cos_sin)
        attend = attention if self.context_parallel is None else self.context_parallel.attention
        out_bhsd = attend(
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

    RoPE's cos/sin are computed each forward for the positions the tokens hold (no table of
    `max_seq_len` rows: at 2M tokens it would take GiBs on every rank). Under context
    parallelism the tokens are this rank's chunks of each sequence (see
    distributed/context_parallel.py): RoPE positions and the attention masks follow the global
    positions those chunks hold.
    """

    context_parallel: "ContextParallel | None" = None
    # Ranks the residual stream's sequence is split over between blocks (tensor parallel's
    # sequence parallel): a later pipeline stage receives only its shard of the hidden state.
    sequence_shards: int = 1
    # The length length-dependent RoPE scalings (dynamic NTK) are evaluated for; None is
    # `args.max_seq_len` (inference sets the context length its KV cache will reach).
    rope_length: int | None = None
    # Set by build_model when `training.loss_chunk_len` asks for the loss in chunks.
    chunked_loss: "ChunkedLoss | None" = None

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

    def forward(
        self,
        tokens_bs: torch.Tensor,
        document_ids_bs: torch.Tensor | None = None,
        positions_bs: torch.Tensor | None = None,
        labels_bs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits; with `labels_bs` (under a chunked loss) the mean loss, computed without
        materializing the whole sequence's logits."""
        first_stage = self.tok_embeddings is not None
        seq_len = tokens_bs.shape[1] * (1 if first_stage else self.sequence_shards)
        h_bsd = self.tok_embeddings(tokens_bs) if first_stage else tokens_bs
        cp, device = self.context_parallel, h_bsd.device
        # Built once per forward and shared by every layer.
        if cp is not None:
            mask = cp.masks(seq_len, document_ids_bs, device)
            positions = cp.local_index(seq_len, device) if positions_bs is None else positions_bs
        else:
            mask = None if document_ids_bs is None else document_mask(document_ids_bs)
            positions = (
                torch.arange(seq_len, device=device) if positions_bs is None else positions_bs
            )
        cos_sin = rope_cos_sin_at(positions, *self.rope_frequencies())
        for layer in self.layers.values():
            h_bsd = layer(h_bsd, cos_sin, mask)
        if self.norm is not None:
            h_bsd = self.norm(h_bsd)
        if labels_bs is not None:
            if self.chunked_loss is None:
                raise ValueError("labels reach the model only under training.loss_chunk_len")
            return self.chunked_loss(h_bsd, self.project, labels_bs)
        return self.project(h_bsd)

    def project(self, h_bsd: torch.Tensor) -> torch.Tensor:
        """Hidden states → logits (unchanged on pipeline stages without the output)."""
        if self.output is not None:
            return self.output(h_bsd)
        if self.args.tie_embeddings and self.tok_embeddings is not None:
            return F.linear(h_bsd, self.tok_embeddings.weight)
        return h_bsd

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        """RoPE's inverse frequencies and attention factor under the args' scaling, read from
        the args at every call so a new scaling (a context schedule's stage) takes effect."""
        args = self.args
        length = self.rope_length or args.max_seq_len
        return rope_frequencies(args.head_dim, length, args.rope_theta, args.rope_scaling)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter. A parameter's values depend on `seed` and its name only,
        so every sharding and pipeline split of the model starts from the same weights."""
        args = self.args
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


def count_params(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once); works on the meta device."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
