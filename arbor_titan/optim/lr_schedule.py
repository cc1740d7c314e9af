"""Linear warmup, then linear, cosine or warmup-stable-decay (WSD) down to a floor.

The multiplier is `functools.partial` over a module-level function, so the scheduler pickles
and its `state_dict()` holds only the step count: on resume the schedule comes from the config,
which lets a run be extended by raising `training.steps`.
"""

import functools
import logging
import math

import torch

from arbor_titan.optim.config import LRSchedulerConfig

logger = logging.getLogger("arbor_titan")


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    decay_start: int,
    total_steps: int,
    cosine: bool,
    min_lr_factor: float,
) -> float:
    """The lr multiplier at `step` (0-based): ramp, plateau until `decay_start`, then decay.

    Warmup gives step s the factor (s+1)/(warmup+1), so the first step already learns.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1 - progress
    return min_lr_factor + (1 - min_lr_factor) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRSchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR reaching `min_lr_factor * lr` at `total_steps`; the same factor for every group.

    WSD holds the peak lr and decays linearly over the last `decay_ratio` of all steps (Hu et
    al. 2024, MiniCPM); the decay never starts before warmup ends. A warmup longer than the run
    (a short smoke run of a long config) is cut to the run's length, with a warning.
    """
    warmup_steps = cfg.warmup_steps
    if warmup_steps > total_steps:
        logger.warning(
            "lr_scheduler.warmup_steps=%d exceeds training.steps=%d: warming up over all %d "
            "steps (the peak lr is never reached, nor any decay)",
            warmup_steps,
            total_steps,
            total_steps,
        )
        warmup_steps = total_steps
    decay_start = warmup_steps
    if cfg.decay_type == "wsd":
        decay_start = max(warmup_steps, total_steps - round(cfg.decay_ratio * total_steps))
    factor = functools.partial(
        lr_factor,
        warmup_steps=warmup_steps,
        decay_start=decay_start,
        total_steps=total_steps,
        cosine=cfg.decay_type == "cosine",
        min_lr_factor=cfg.min_lr_factor,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
