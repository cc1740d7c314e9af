"""Train like `python -m arbor_titan.train`, but die by SIGKILL at a chosen point.

crash_train.py --kill-after-step N ARGS...        killed between checkpoints
crash_train.py --kill-while-saving-step N ARGS... killed after writing step N's shards,
                                                  before the checkpoint is published
"""

import os
import signal
import sys

import arbor_titan.checkpoint.manager as manager
import arbor_titan.trainer as trainer
from arbor_titan.train import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int) -> None:
    original = trainer.Trainer.train_step

    def train_step(self):
        if self.state.step == step:
            die()
        return original(self)

    trainer.Trainer.train_step = train_step


def kill_while_saving(step: int) -> None:
    original = manager.publish

    def publish(temp, final):
        if final.name == f"step-{step}":
            die()
        original(temp, final)

    manager.publish = publish


if __name__ == "__main__":
    mode, step, *args = sys.argv[1:]
    {"--kill-after-step": kill_after_step, "--kill-while-saving-step": kill_while_saving}[mode](
        int(step)
    )
    sys.exit(main(args))
