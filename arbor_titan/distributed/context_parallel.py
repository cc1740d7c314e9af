"""Context parallelism: the ranks of a cp group split every sequence and attend exactly.

Load balancing for causal attention: a sequence is cut into 2·cp equal chunks and rank r holds
chunks r and 2·cp-1-r (a head and a tail), so every rank has the same share of the causal
attention's work. Tokens, labels, positions and document ids are split after the batch leaves
the data loader (every cp rank reads the same batch); only attention needs the other ranks.

Two attentions (`parallelism.context_parallel_attention`):
- `all_gather` (default): the formulation Llama 3 used for long-context training. Keys and
  values are all-gathered over the cp group (backward reduce-scatters their gradients) and each
  local query chunk attends to the global prefix it may see. It is exact, runs on every device
  and backend (gloo included), and composes with tensor parallel (it sees the local heads),
  pipeline stages (nothing but the hidden state travels) and document masking (document ids
  are gathered alongside).
- `torch_ring`: torch's experimental context-parallel SDPA, which runs the CUDA flash,
  memory-efficient and cuDNN kernels shard by shard and merges them by log-sum-exp. It handles
  only those CUDA kernels and plain causal attention, and its load-balanced layout is the head
  and tail chunks above, so the two share every other piece.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.attention.bias import causal_lower_right

from arbor_titan.distributed.parallel_dims import ParallelDims


def chunk_positions(rank: int, degree: int, chunk_len: int, device: torch.device) -> torch.Tensor:
    """Global positions of the head chunk `rank` and the tail chunk `2·degree-1-rank` that cp
    rank `rank` holds, in its local order."""
    index = torch.arange(chunk_len, device=device)
    tail = 2 * degree - 1 - rank
    return torch.cat([rank * chunk_len + index, tail * chunk_len + index])


class _GatherSequence(torch.autograd.Function):
    """All-gather the local chunks (dim 0) of every cp rank into global sequence order; the
    backward reduce-scatters (sums) the gradient back to each rank's own chunks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, cp: "ContextParallel") -> torch.Tensor:
        ctx.cp = cp
        gathered = local.new_empty((cp.degree * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(gathered, local.contiguous(), group=cp.group)
        order = cp.rank_order_index(gathered.shape[0], local.device)
        return torch.empty_like(gathered).index_copy_(0, order, gathered)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor) -> tuple[torch.Tensor, None]:
        cp = ctx.cp
        order = cp.rank_order_index(grad_global.shape[0], grad_global.device)
        in_rank_order = grad_global.index_select(0, order).contiguous()
        grad_local = in_rank_order.new_empty(
            (in_rank_order.shape[0] // cp.degree, *in_rank_order.shape[1:])
        )
        dist.reduce_scatter_tensor(grad_local, in_rank_order, group=cp.group)
        return grad_local, None


def check_attention_runs_here(method: str, device: torch.device, document_mask: bool) -> None:
    """Refuse a cp attention that can't run this job, before anything is built."""
    if method != "torch_ring":
        return
    key = 'parallelism.context_parallel_attention = "torch_ring"'
    if device.type != "cuda":
        raise ValueError(
            f"{key} needs CUDA: torch's ring attention dispatches only the CUDA SDPA kernels "
            f'(flash, memory-efficient, cuDNN); on {device.type} use "all_gather" (exact on '
            "every device)"
        )
    if document_mask:
        raise ValueError(
            f"{key} computes plain causal attention only; data.document_mask = true needs "
            '"all_gather", which gathers the document ids with the keys and values'
        )


def enable_torch_ring_attention() -> None:
    """Route SDPA on sequence-sharded DTensors to torch's ring attention, for this process.

    torch keeps this switch in a private module (torch.distributed.tensor.experimental); its
    causal load balancing must stay on: it is the head-and-tail layout this module shards by."""
    try:
        from torch.distributed.tensor.experimental._attention import (
            _cp_options,
            _enable_context_parallel_dispatcher,
        )
    except ImportError as err:
        raise ValueError(
            'parallelism.context_parallel_attention = "torch_ring" needs torch\'s context-'
            f"parallel dispatcher, which torch {torch.__version__} lacks ({err}); use "
            '"all_gather"'
        ) from err
    _cp_options.enable_load_balance = True
    _enable_context_parallel_dispatcher()


@dataclass(frozen=True)
class ReversedPrefixCausal:
    """A query chunk's lower-right causal mask over the longer prefix it may see, for SDPA off
    CUDA: it has no kernel for that alignment and would materialize chunk × prefix elements,
    quadratic in length, and keep them for backward. With the chunk's queries reversed, whether
    query i may see key j depends on i + j alone, so the additive mask is a (chunk, prefix) view
    with strides (1, 1) of one vector of chunk + prefix - 1 elements: exact, and linear."""

    chunk_len: int
    prefix_len: int

    def attend(
        self, q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, gqa: bool
    ) -> torch.Tensor:
        bias = q_bhsd.new_full((self.chunk_len + self.prefix_len - 1,), float("-inf"))
        bias[: self.prefix_len] = 0.0  # reversed query i sees key j while i + j < prefix
        mask = bias.as_strided((self.chunk_len, self.prefix_len), (1, 1))
        out = F.scaled_dot_product_attention(
            q_bhsd.flip(2), k_bhsd, v_bhsd, attn_mask=mask, enable_gqa=gqa
        )
        return out.flip(2)


class ContextParallel:
    """One rank's view of its cp group: which tokens it holds and how it attends."""

    def __init__(
        self, group: dist.ProcessGroup, method: str = "all_gather", mesh: DeviceMesh | None = None
    ):
        self.group, self.method, self.mesh = group, method, mesh
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # Global chunk indices of the local head and tail chunk, out of 2·degree.
        self.chunks = (self.rank, 2 * self.degree - 1 - self.rank)
        if method == "torch_ring":
            enable_torch_ring_attention()

    @classmethod
    def from_dims(cls, dims: ParallelDims, method: str = "all_gather") -> "ContextParallel | None":
        if dims.cp == 1:
            return None
        mesh = dims.mesh["cp"]
        return cls(mesh.get_group(), method, mesh)

    def check_seq_len(self, seq_len: int, key: str = "training.seq_len") -> None:
        if seq_len % (2 * self.degree):
            raise ValueError(
                f"{key}={seq_len} must be divisible by 2 × parallelism.context_parallel_degree "
                f"= {2 * self.degree} (each cp rank holds a head and a tail chunk)"
            )

    def local_index(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Global positions (seq_len//cp,) of the tokens this rank holds, in local order."""
        return chunk_positions(self.rank, self.degree, local_len // 2, device)

    def rank_order_index(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Global positions of an all-gathered sequence, which arrives in rank order."""
        chunk_len = seq_len // (2 * self.degree)
        return torch.cat(
            [chunk_positions(r, self.degree, chunk_len, device) for r in range(self.degree)]
        )

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-length tensor (sequence on `dim`)."""
        self.check_seq_len(tensor.shape[dim])
        index = self.local_index(tensor.shape[dim] // self.degree, tensor.device)
        return tensor.index_select(dim, index)

    def shard_batch(
        self, inputs_bs: torch.Tensor, labels_bs: torch.Tensor, extra: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's share of a batch: tokens, labels and the model's extra inputs (document
        ids, positions), which were computed on the whole sequences."""
        return (
            self.shard(inputs_bs),
            self.shard(labels_bs),
            {name: self.shard(value) for name, value in extra.items()},
        )

    def gather(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """The full sequence in global order from every rank's local tokens (differentiable)."""
        gathered = _GatherSequence.apply(local.movedim(dim, 0), self)
        return gathered.movedim(0, dim)

    def masks(
        self, local_len: int, document_ids_bs: torch.Tensor | None, device: torch.device
    ) -> tuple:
        """The attention mask of each local chunk over the global prefix it may see.

        Plain causal: on CUDA a lower-right-aligned causal bias (SDPA keeps its fused kernels);
        elsewhere SDPA's own causal case for a square prefix (chunk 0), else a
        `ReversedPrefixCausal`. Documents: a boolean (batch, 1, chunk, prefix) mask, same
        document and not later, from the document ids gathered over the group."""
        chunk_len = local_len // 2
        if self.method == "torch_ring":  # plain causal only (check_attention_runs_here)
            return ()
        if document_ids_bs is None:
            return tuple(
                causal_lower_right(chunk_len, (chunk + 1) * chunk_len)
                if device.type == "cuda" or chunk == 0
                else ReversedPrefixCausal(chunk_len, (chunk + 1) * chunk_len)
                for chunk in self.chunks
            )
        with torch.no_grad():
            global_ids_bs = self.gather(document_ids_bs, dim=1)
        masks = []
        for chunk in self.chunks:
            end = (chunk + 1) * chunk_len
            query_pos = torch.arange(chunk * chunk_len, end, device=device)
            causal_qk = torch.arange(end, device=device)[None, :] <= query_pos[:, None]
            query_ids = global_ids_bs[:, chunk * chunk_len : end, None]
            same_document = query_ids == global_ids_bs[:, None, :end]
            masks.append((same_document & causal_qk)[:, None])
        return tuple(masks)

    def attention(
        self, q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, masks: tuple
    ) -> torch.Tensor:
        """Exact attention of the local queries over the whole sequence."""
        if self.method == "torch_ring":
            return self.ring_attention(q_bhsd, k_bhsd, v_bhsd)
        k_bhsd, v_bhsd = self.gather(k_bhsd, dim=2), self.gather(v_bhsd, dim=2)
        chunk_len = q_bhsd.shape[2] // 2
        gqa = q_bhsd.shape[1] != k_bhsd.shape[1]
        outs = []
        for half, (chunk, mask) in enumerate(zip(self.chunks, masks)):
            end = (chunk + 1) * chunk_len
            q_chunk = q_bhsd[:, :, half * chunk_len : (half + 1) * chunk_len]
            k_prefix, v_prefix = k_bhsd[:, :, :end], v_bhsd[:, :, :end]
            if isinstance(mask, ReversedPrefixCausal):
                out = mask.attend(q_chunk, k_prefix, v_prefix, gqa)
            else:
                out = F.scaled_dot_product_attention(
                    q_chunk, k_prefix, v_prefix, attn_mask=mask, enable_gqa=gqa
                )
            outs.append(out)
        return torch.cat(outs, dim=2)

    def ring_attention(
        self, q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor
    ) -> torch.Tensor:
        """torch's ring attention over the cp mesh: the local chunks as sequence-sharded
        DTensors, whose causal SDPA (forward and backward) torch computes across the ranks."""
        repeat = q_bhsd.shape[1] // k_bhsd.shape[1]
        if repeat > 1:  # its kernels take as many key/value heads as query heads
            k_bhsd = k_bhsd.repeat_interleave(repeat, dim=1)
            v_bhsd = v_bhsd.repeat_interleave(repeat, dim=1)
        q, k, v = (
            DTensor.from_local(t, self.mesh, [Shard(2)], run_check=False)
            for t in (q_bhsd, k_bhsd, v_bhsd)
        )
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).to_local()
