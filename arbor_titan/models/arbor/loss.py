"""The next-token loss in chunks, so full-vocabulary logits never exist for a whole sequence.

At long context the logits dominate activation memory: 128K positions × a 128K vocabulary in
fp32 is 64 GiB. A chunked loss projects and scores `chunk_len` positions at a time, and
checkpoints each chunk, so backward recomputes that chunk's logits instead of keeping them:
logits (and their gradient) exist for one chunk at a time. The price is one more output
projection per token in backward.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# A label that adds nothing to the loss (a prompt token of a chat conversation; PyTorch's default).
IGNORE_INDEX = -100


def counted_labels(labels_bs: torch.Tensor) -> torch.Tensor:
    """How many labels count (are not IGNORE_INDEX)."""
    return (labels_bs != IGNORE_INDEX).sum()


def cross_entropy_loss(logits_bsv: torch.Tensor, labels_bs: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the labels that count, in float32 whatever the compute dtype;
    0 (with zero gradients, not NaN) when none does."""
    total = F.cross_entropy(
        logits_bsv.flatten(0, 1).float(),
        labels_bs.flatten(0, 1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / counted_labels(labels_bs).clamp(min=1)


class ChunkedLoss:
    """Mean of `loss_fn` over the labels that count, computed `chunk_len` sequence positions at
    a time.

    `loss_fn(logits_bsv, labels_bs)` is the plain mean loss (the trainer's, compiled or not);
    each chunk's mean is weighted by its counted labels, so the result is the whole mean."""

    def __init__(self, loss_fn: LossFn, chunk_len: int):
        self.loss_fn, self.chunk_len = loss_fn, chunk_len

    def __call__(
        self,
        h_bsd: torch.Tensor,
        project: Callable[[torch.Tensor], torch.Tensor],
        labels_bs: torch.Tensor,
    ) -> torch.Tensor:
        def chunk_loss_sum(h_chunk: torch.Tensor, labels_chunk: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(project(h_chunk), labels_chunk) * counted_labels(labels_chunk)

        total = torch.zeros((), device=h_bsd.device)
        for h_chunk, labels_chunk in zip(
            h_bsd.split(self.chunk_len, dim=1), labels_bs.split(self.chunk_len, dim=1)
        ):
            total = total + checkpoint(chunk_loss_sum, h_chunk, labels_chunk, use_reentrant=False)
        return total / counted_labels(labels_bs).clamp(min=1)


def check_chunked_loss(
    chunk_len: int, pipeline_parallel_degree: int, tensor_parallel_degree: int
) -> None:
    """The chunked loss runs inside the model's forward: refuse the layouts where the loss is
    applied elsewhere, before anything is built."""
    if not chunk_len:
        return
    if pipeline_parallel_degree > 1:
        raise ValueError(
            f"training.loss_chunk_len = {chunk_len} is not supported with pipeline parallelism "
            f"(parallelism.pipeline_parallel_degree = {pipeline_parallel_degree}): the schedule "
            "applies the loss to the last stage's logits; set training.loss_chunk_len = 0"
        )
    if tensor_parallel_degree > 1:
        raise ValueError(
            f"training.loss_chunk_len = {chunk_len} is not supported with tensor parallelism "
            f"(parallelism.tensor_parallel_degree = {tensor_parallel_degree}): loss parallel "
            "already keeps only a 1/tp vocabulary shard of the logits; set "
            "training.loss_chunk_len = 0"
        )
