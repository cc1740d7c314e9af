"""The Arbor model's tensor + sequence parallel plan, declared beside the model.

Between blocks the residual stream is sharded on the sequence dimension (sequence parallel, so
norms and residual adds run on 1/tp of the tokens); inside attention and the FFN the weights are
split Megatron-style: column-wise in, row-wise out, one all-gather and one reduce-scatter each.

Query heads are always split over tp. The kv heads are split too when tp divides them; when it
doesn't (the 200b flavor's 12 kv heads at tp 8), wk and wv are replicated over tp instead and
each rank projects only the kv heads its own query heads read (`ReplicatedKV`), as serving
engines do when tensor parallel ranks outnumber the kv heads.
"""

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from arbor_titan.models.arbor.args import ArborArgs


def root_plan(loss_parallel: bool) -> dict[str, ParallelStyle]:
    """Embedding in, final norm and output projection out (vocab-sharded with loss parallel)."""
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }


def block_plan(replicate_kv: bool = False) -> dict[str, ParallelStyle]:
    """One transformer block; attention's other inputs (RoPE table, document mask) stay plain.
    With `replicate_kv`, wk and wv are whole on every rank (see `ReplicatedKV`)."""
    kv_style = ReplicateParallel() if replicate_kv else ColwiseParallel()
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": kv_style,
        "attention.wv": kv_style,
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


class ReplicateParallel(ParallelStyle):
    """Every tp rank holds the module's parameters whole, as Replicate DTensors: FSDP2 still
    shards them over data parallel and checkpoints reshard them like any other weight. The
    module's caller decides what each rank computes with them (see `ReplicatedKV`)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh)  # no partition_fn: replicate


def replicates_kv(n_kv_heads: int, tp: int) -> bool:
    """Whether tensor parallel over `tp` ranks replicates wk/wv rather than splitting them."""
    return n_kv_heads % tp != 0


def kv_heads_read(n_heads: int, n_kv_heads: int, tp: int, rank: int) -> list[int]:
    """The kv head each of tp rank `rank`'s query heads reads, in query order: the rank holds
    query heads rank·H/tp ... (rank+1)·H/tp - 1, and query head h reads kv head h // (H/KV)."""
    local, group = n_heads // tp, n_heads // n_kv_heads
    return [head // group for head in range(rank * local, (rank + 1) * local)]


def local_kv_heads(n_heads: int, n_kv_heads: int, tp: int) -> tuple[int, int]:
    """(kv heads a tp rank projects at most, kv heads it attends with): its 1/tp share twice,
    or under replication the distinct kv heads its query heads read, then a copy per query
    head (the planner's activation terms)."""
    if not replicates_kv(n_kv_heads, tp):
        return n_kv_heads // tp, n_kv_heads // tp
    projected = max(len(set(kv_heads_read(n_heads, n_kv_heads, tp, r))) for r in range(tp))
    return projected, n_heads // tp


@dataclass(frozen=True)
class ReplicatedKV:
    """One tp rank's keys and values when tp does not divide the kv heads.

    wk and wv are replicated over tp (`ReplicateParallel`); the rank projects only `rows` of
    them (the kv heads its query heads read: 2 of 12 on each rank for the 200b flavor at tp 8,
    a head where two ranks' query heads meet being projected on both) and repeats each head for
    the query heads reading it (`copies`), so locally attention is plain multi-head attention.

    Each rank uses different rows of the replicated weights and of the replicated input, so
    their gradients from here are partial sums over tp: `to_local(grad_placements=[Partial()])`
    has DTensor sum them (FSDP2 all-reduces a weight's before its reduce-scatter; without FSDP
    the gradient stays Partial and the optimizer's and gradient clipping's DTensor ops reduce it).
    """

    rows: slice
    copies: tuple[tuple[int, int], ...]  # (projected head, query heads reading it), query order
    head_dim: int

    @classmethod
    def for_rank(cls, args: ArborArgs, tp: int, rank: int) -> "ReplicatedKV":
        reads = kv_heads_read(args.n_heads, args.n_kv_heads, tp, rank)
        first, last = reads[0], reads[-1]
        copies = tuple((head - first, len(list(run))) for head, run in itertools.groupby(reads))
        rows = slice(first * args.head_dim, (last + 1) * args.head_dim)
        return cls(rows, copies, args.head_dim)

    def __call__(
        self, x_bsd: DTensor, wk: DTensor, wv: DTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, seq, local query heads, head_dim) from the all-gathered
        (Replicate) attention input."""
        x_bsd = x_bsd.to_local(grad_placements=[Partial()])
        return self._project(x_bsd, wk), self._project(x_bsd, wv)

    def _project(self, x_bsd: torch.Tensor, weight: DTensor) -> torch.Tensor:
        rows = weight.to_local(grad_placements=[Partial()])[self.rows]
        heads_bshd = F.linear(x_bsd, rows).unflatten(-1, (-1, self.head_dim))
        bsz, seq_len, _, head_dim = heads_bshd.shape
        return torch.cat(
            [
                heads_bshd[:, :, head : head + 1].expand(bsz, seq_len, count, head_dim)
                for head, count in self.copies
            ],
            dim=2,
        )
