"""Activation checkpointing: trade recomputation for memory, per block or per op."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from arbor_titan.config.fields import option

# Ops whose outputs selective "op" mode keeps: the matmuls and attention, the expensive part of
# a block. Everything else (norms, SiLU, RoPE, residual adds) is recomputed, which costs few
# FLOPs but frees most of the activation memory of a block.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_mm.default,  # float8 matmuls (torchao) on GPUs
}


@dataclass
class ActivationCheckpointConfig:
    """The `[activation_checkpoint]` section."""

    mode: str = option(
        "none",
        "none, full (every block), selective, or auto: the cheapest of these three that the "
        "planner says fits training.memory_budget_gib (default: the device's memory).",
    )
    selective_ac_option: str = option(
        "2",
        "With selective: an integer k checkpoints every k-th block; 'op' keeps matmul and "
        "attention outputs in every block and recomputes the rest.",
    )

    def __post_init__(self) -> None:
        if self.mode not in ("none", "full", "selective", "auto"):
            raise ValueError(
                "activation_checkpoint.mode must be 'none', 'full', 'selective' or 'auto', "
                f"got {self.mode!r}"
            )
        option = self.selective_ac_option
        if option != "op" and (not option.isdigit() or int(option) < 1):
            raise ValueError(
                "activation_checkpoint.selective_ac_option must be a positive integer or 'op', "
                f"got {option!r}"
            )


def _save_matmuls_and_attention(ctx, op: Callable, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(blocks: nn.ModuleDict, cfg: ActivationCheckpointConfig) -> None:
    """Wrap the chosen blocks in place (names stay loadable: DCP strips the wrapper prefix)."""
    if cfg.mode == "auto":
        raise ValueError(
            "activation_checkpoint.mode = auto must be resolved to a mode before the model is "
            "built (arbor_titan.estimate.auto_ac)"
        )
    if cfg.mode == "none":
        return
    for index, (name, block) in enumerate(list(blocks.items())):
        if cfg.mode == "full":
            blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif cfg.selective_ac_option == "op":
            blocks[name] = checkpoint_wrapper(
                block,
                context_fn=partial(
                    create_selective_checkpoint_contexts, _save_matmuls_and_attention
                ),
                preserve_rng_state=False,
            )
        elif index % int(cfg.selective_ac_option) == 0:
            blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)
