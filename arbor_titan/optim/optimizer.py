"""AdamW with weight decay only where it regularizes: matrices, not gains, biases or embeddings."""

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from arbor_titan.optim.config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, always in this order: decayed matrices, then 1-D params and embeddings.

    Decaying norm gains and biases pulls them toward 0 for no benefit, and decaying embedding
    rows penalizes rare tokens (GPT-2/nanoGPT practice). Both groups exist even when empty so
    the optimizer's state layout, and so its checkpoints, do not depend on the model.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "embed" in name else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def implementation_kwargs(implementation: str, params: list[torch.Tensor]) -> dict[str, bool]:
    """The `fused`/`foreach` flags for `implementation`; 'auto' picks fused where torch has it.

    `param.device` is the local device for DTensors too, so this is FSDP2/TP-safe.
    """
    if implementation == "auto":
        # torch's own list (private, but what torch.optim checks), so it tracks new backends.
        supported = _get_fused_kernels_supported_devices()
        fused = all(p.device.type in supported for p in params)
        implementation = "fused" if fused else "foreach"
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters in the two groups of `param_groups`."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        **implementation_kwargs(cfg.implementation, params),
    )
