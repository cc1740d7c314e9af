"""Train like `python -m arbor_titan.train`, with a fault injected at chosen steps.

fault_train.py --nonfinite-steps 3,5 ARGS...  the loss of steps 3 and 5 is NaN (so are their
                                              gradients)
fault_train.py --kill-rank-at-step R:N ARGS... rank R dies by SIGKILL before step N, in the
                                              job's first attempt only (torchrun restarts it)
"""

import os
import signal
import sys

import arbor_titan.trainer as trainer
from arbor_titan.health.restart import RESTART_COUNT_ENV
from arbor_titan.train import main


def nonfinite_at(steps: set[int]) -> None:
    original = trainer.Trainer.model_loss

    def model_loss(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.state.step + 1 in steps else loss

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
    else:
        raise SystemExit(f"unknown fault {mode}")
    sys.exit(main(args))
