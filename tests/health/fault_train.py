"""Train like `python -m arbor_titan.train`, with a fault injected at chosen steps.

fault_train.py --nonfinite-steps 3,5 ARGS...  the loss of steps 3 and 5 is NaN (so are their
                                              gradients)
fault_train.py --kill-rank-at-step R:N ARGS... rank R dies by SIGKILL before step N, in the
                                              job's first attempt only (torchrun restarts it)
fault_train.py --oom-at-step N:K ARGS...        the first K attempts of step N raise
                                              torch.OutOfMemoryError after a forward, on every
                                              rank
"""

import os
import signal
import sys

import torch

import arbor_titan.trainer as trainer
from arbor_titan.health.restart import RESTART_COUNT_ENV
from arbor_titan.train import main


def nonfinite_at(steps: set[int]) -> None:
    original = trainer.Trainer.model_loss

    def model_loss(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.state.step + 1 in steps else loss

    trainer.Trainer.model_loss = model_loss


def oom_at_step(step: int, attempts: int) -> None:
    original = trainer.Trainer.model_loss
    raised = 0

    def model_loss(self, *args, **kwargs):
        nonlocal raised
        loss = original(self, *args, **kwargs)
        if self.state.step + 1 == step and raised < attempts:
            raised += 1
            raise torch.OutOfMemoryError(f"injected out-of-memory error {raised} of {attempts}")
        return loss

    trainer.Trainer.model_loss = model_loss


def kill_rank_at_step(rank: int, step: int) -> None:
    original = trainer.Trainer.train_step

    def train_step(self):
        first_attempt = os.environ.get(RESTART_COUNT_ENV, "0") == "0"
        if first_attempt and self.proc.rank == rank and self.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    trainer.Trainer.train_step = train_step


if __name__ == "__main__":
    mode, value, *args = sys.argv[1:]
    if mode == "--nonfinite-steps":
        nonfinite_at({int(s) for s in value.split(",")})
    elif mode == "--kill-rank-at-step":
        rank, step = value.split(":")
        kill_rank_at_step(int(rank), int(step))
    elif mode == "--oom-at-step":
        step, attempts = value.split(":")
        oom_at_step(int(step), int(attempts))
    else:
        raise SystemExit(f"unknown fault {mode}")
    sys.exit(main(args))
