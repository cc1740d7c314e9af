"""Optimizer and learning-rate schedule, each built from its own config section."""

from arbor_titan.optim.config import LRSchedulerConfig, OptimizerConfig
from arbor_titan.optim.lr_schedule import build_lr_scheduler
from arbor_titan.optim.optimizer import build_optimizer

__all__ = ["LRSchedulerConfig", "OptimizerConfig", "build_lr_scheduler", "build_optimizer"]
