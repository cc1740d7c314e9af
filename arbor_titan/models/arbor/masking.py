"""Document masking for packed sequences: each token attends only to earlier tokens of its own
document, and (optionally) its RoPE position counts from the document's start.

The token stream is `[BOS] doc [EOS] [BOS] doc [EOS] ...`, so a window's documents are read off
its inputs: a new document starts at every BOS (tokens before the window's first BOS are the
tail of a document that began earlier, document 0). The data loader needs no change.

Two exact kernels: on CUDA, flex attention with a block-sparse `BlockMask` (fully masked tiles
are skipped, so a packed batch costs what its documents do); elsewhere, SDPA with a boolean
(batch, 1, seq, seq) mask. Without documents the model keeps SDPA's `is_causal` fast path.
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from arbor_titan.data.config import DataConfig

try:  # flex attention: torch >= 2.5, used on CUDA only
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    # Eager flex attention is a slow reference implementation; compiled it is a fused kernel.
    # Inside compiled blocks this is inlined into the block's graph.
    _flex_attention = torch.compile(flex_attention, dynamic=False)
    _create_block_mask = torch.compile(create_block_mask, dynamic=False)
except ImportError:
    BlockMask = None

# What `Attention` receives: None (plain causal), a boolean SDPA mask, or a flex `BlockMask`.
AttentionMask = torch.Tensor | BlockMask | None


def document_inputs(
    tokens_bs: torch.Tensor, bos_id: int, restart_positions: bool
) -> dict[str, torch.Tensor]:
    """The `Transformer.forward` keyword inputs for packed `tokens_bs`: document ids (a running
    count of BOS tokens) and, with `restart_positions`, each token's offset in its document."""
    is_start_bs = tokens_bs == bos_id
    inputs = {"document_ids_bs": torch.cumsum(is_start_bs, dim=1)}
    if restart_positions:
        index_bs = torch.arange(tokens_bs.shape[1], device=tokens_bs.device).expand_as(tokens_bs)
        # Each token's document start: the latest BOS index at or before it (0 for document 0).
        start_bs = torch.where(is_start_bs, index_bs, 0).cummax(dim=1).values
        inputs["positions_bs"] = index_bs - start_bs
    return inputs


def model_inputs(
    tokens_bs: torch.Tensor, data: "DataConfig", bos_id: int
) -> dict[str, torch.Tensor]:
    """The model's extra inputs that `[data]` asks for: none unless `document_mask` is on."""
    if not data.document_mask:
        return {}
    return document_inputs(tokens_bs, bos_id, data.restart_positions)


def check_document_mask(data: "DataConfig", pipeline_parallel_degree: int) -> None:
    """Pipeline stages pass each other only the hidden state, so the document ids can't reach
    the later stages' attention: refuse the combination before anything is built."""
    if data.document_mask and pipeline_parallel_degree > 1:
        raise ValueError(
            "data.document_mask = true is not supported with pipeline parallelism "
            f"(parallelism.pipeline_parallel_degree = {pipeline_parallel_degree}): the stages "
            "pass only the hidden state; set one of them off (degree 1)"
        )


def uses_flex_attention(device: torch.device) -> bool:
    return BlockMask is not None and device.type == "cuda"


def document_mask(document_ids_bs: torch.Tensor) -> AttentionMask:
    """The mask for `document_ids_bs`: a flex `BlockMask` on CUDA, else a boolean SDPA mask."""
    if uses_flex_attention(document_ids_bs.device):
        return document_block_mask(document_ids_bs)
    return document_sdpa_mask(document_ids_bs)


def document_sdpa_mask(document_ids_bs: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean, True where a query may attend: same document, not later.
    Every query sees at least itself, so no row is fully masked (which would give NaN)."""
    seq_len = document_ids_bs.shape[1]
    causal_ss = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids_bs.device)
    same_document_bss = document_ids_bs[:, :, None] == document_ids_bs[:, None, :]
    return (same_document_bss & causal_ss.tril())[:, None]


def document_block_mask(document_ids_bs: torch.Tensor) -> "BlockMask":
    """The same mask as `document_sdpa_mask`, block-sparse for flex attention."""

    def same_document_causal(b, h, q_idx, kv_idx):
        same_document = document_ids_bs[b, q_idx] == document_ids_bs[b, kv_idx]
        return (q_idx >= kv_idx) & same_document

    bsz, seq_len = document_ids_bs.shape
    return _create_block_mask(
        same_document_causal, bsz, None, seq_len, seq_len, device=document_ids_bs.device
    )


def attention(
    q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, mask: AttentionMask
) -> torch.Tensor:
    """Causal attention under `mask` (None = plain causal); grouped-query heads broadcast."""
    gqa = q_bhsd.shape[1] != k_bhsd.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(
            q_bhsd, k_bhsd, v_bhsd, is_causal=True, enable_gqa=gqa
        )
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(
            q_bhsd, k_bhsd, v_bhsd, attn_mask=mask, enable_gqa=gqa
        )
    return _flex_attention(q_bhsd, k_bhsd, v_bhsd, block_mask=mask, enable_gqa=gqa)
