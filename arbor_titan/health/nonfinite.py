"""Skip the update of a step whose loss or gradient norm is not finite; stop after too many.

An Inf or NaN that reached the optimizer would poison every weight and, at the next save, the
checkpoint. Skipping the update keeps the weights those of the last finite step; a run that keeps
producing non-finite steps is diverging, so it stops before any more compute is spent, leaving
its checkpoints as they were (a save during the streak holds the last finite step's weights).
"""

import torch
import torch.distributed as dist

from arbor_titan.metrics.logger import MetricLogger


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Decides, identically on every rank, whether a step's optimizer update is applied."""

    def __init__(self, limit: int, metrics: MetricLogger) -> None:
        self.limit = limit  # `training.nonfinite_skip_limit`
        self.metrics = metrics
        self.in_a_row = 0

    def allows_update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when every rank's loss and the global gradient norm are finite.

        Their sum over the world is finite only if every term is, so one all-reduce lets all
        ranks agree (a rank that skipped alone would leave the replicas out of step).
        """
        probe = (loss.detach().float() + grad_norm.detach().float()).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(probe)
        if bool(torch.isfinite(probe).item()):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.metrics.log_event(
            step,
            "nonfinite_step_skipped",
            {
                "loss": float(loss),
                "grad_norm": float(grad_norm),
                "in_a_row": self.in_a_row,
                "limit": self.limit,
            },
        )
        if self.in_a_row > self.limit:
            raise NonFiniteError(
                f"training stopped at step {step}: {self.in_a_row} steps in a row had a "
                f"non-finite loss or gradient norm (training.nonfinite_skip_limit={self.limit}); "
                "their updates were skipped, so every checkpoint holds the weights of a finite "
                "step: lower optimizer.lr or raise lr_scheduler.warmup_steps, then resume"
            )
        return False
