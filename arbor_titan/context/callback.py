"""Adaptive context in the trainer: before each step, the schedule's shape for it.

At a change the trainer re-packs the data from the loader's position (nothing lost or repeated),
resizes the step's token count and FLOPs per token, and swaps the RoPE table for a new scaling;
under pipeline parallelism the stages rebuild for the new shape on their next batch. The
schedule's state is in every checkpoint (the loader's always is), so a run killed mid-schedule
resumes at the same shape and position.

This callback runs before the checkpoint manager: after step N it observes the loss before the
checkpoint saves the schedule's state, and the shape of step N + 1 is set in `on_step_start`,
after a resume's load, from the same state in the run that went on and the run that resumed.

Under `[compile] enable`, nothing is marked dynamic by hand: dynamo's automatic dynamic shapes
compile each block twice — a static graph at the first length, then one with a symbolic length
and batch at the second — and every later length, batch and RoPE table reuses it. Measured on
the debug model with inductor at lengths 64, 128, 192, 256, 320: 2 compiles (28 s, 17 s on a
2-core CPU), none after (tests/context/test_context_compile.py holds the count).
"""

import dataclasses
import logging
from typing import TYPE_CHECKING

from arbor_titan.callbacks import Callback
from arbor_titan.config.job import TrainingConfig
from arbor_titan.config.loader import ConfigError
from arbor_titan.context.build import build_context_schedule
from arbor_titan.context.config import ContextConfig
from arbor_titan.context.schedule import ContextShape
from arbor_titan.distributed.pipeline import num_microbatches
from arbor_titan.models.arbor.args import ArborArgs

if TYPE_CHECKING:
    from arbor_titan.trainer import Trainer

logger = logging.getLogger("arbor_titan")


class ContextCallback(Callback):
    def __init__(self, cfg: ContextConfig, training: TrainingConfig):
        self.cfg = cfg
        self.schedule = build_context_schedule(cfg, training.seq_len, training.local_batch_size)
        self.shape: ContextShape | None = None  # the shape the trainer runs now

    def on_model_args(self, trainer: "Trainer", args: ArborArgs) -> ArborArgs:
        # Registered before the checkpoint is loaded, so a resume restores the schedule's state.
        trainer.checkpoint_extras["context_schedule"] = self
        check_layout(self.schedule.shapes(), trainer)
        # The RoPE table covers the run's longest length, validation's included.
        longest = max(self.schedule.max_seq_len, trainer.cfg.validation.seq_len)
        return dataclasses.replace(
            args, max_seq_len=longest, rope_scaling=self.schedule.shape(0).rope
        )

    def on_step_start(self, trainer: "Trainer") -> None:
        step = trainer.state.step
        shape = self.schedule.shape(step)
        if shape == self.shape:
            return
        # Logged at each change and for the first step run (from 0, or after a resume).
        trainer.set_context(shape.seq_len, shape.local_batch_size, shape.rope)
        trainer.metrics.log_event(step, "context", shape.fields())
        self.shape = shape

    def on_step_end(self, trainer: "Trainer") -> None:
        if self.schedule.reads_loss:
            self.schedule.observe(trainer.state.step, trainer.reduce_loss(trainer.last_loss))

    def state_dict(self) -> dict:
        """The schedule's state, under its name: a checkpoint tells which schedule saved it."""
        return {"schedule": self.cfg.schedule, "state": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["schedule"] != self.cfg.schedule:
            # A resumed run may switch schedules (e.g. to extend further); the old state can't
            # describe the new one.
            logger.warning(
                "context.schedule is %r, the checkpoint's was %r: the schedule starts afresh",
                self.cfg.schedule,
                state["schedule"],
            )
            return
        self.schedule.load_state_dict(state["state"])


def check_layout(shapes: list[ContextShape], trainer: "Trainer") -> None:
    """Every shape the schedule can answer fits this run's parallelism, checked before step 0."""
    dims, cfg = trainer.dims, trainer.cfg
    # A length or batch the schedule didn't change is the [training] key's.
    lengths = [
        ("training.seq_len" if shape.seq_len == cfg.training.seq_len else "context.schedule",
         shape.seq_len)
        for shape in shapes
    ]  # fmt: skip
    if cfg.validation.seq_len:
        lengths.append(("validation.seq_len", cfg.validation.seq_len))
    for key, seq_len in lengths:
        if dims.cp > 1 and seq_len % (2 * dims.cp):
            raise ConfigError(
                f"{key}: sequence length {seq_len} is not divisible by 2 × "
                f"parallelism.context_parallel_degree={dims.cp} (each cp rank holds a head and "
                "a tail chunk of every sequence)"
            )
        if seq_len % dims.tp:
            raise ConfigError(
                f"{key}: sequence length {seq_len} is not divisible by "
                f"parallelism.tensor_parallel_degree={dims.tp} (sequence parallel splits every "
                "sequence across the tensor-parallel ranks)"
            )
    if dims.pp > 1:
        microbatches = num_microbatches(cfg.parallelism, dims.pp)
        for shape in shapes:
            if shape.local_batch_size % microbatches:
                key = (
                    "training.local_batch_size"
                    if shape.local_batch_size == cfg.training.local_batch_size
                    else "context.keep_tokens_per_step"
                )
                raise ConfigError(
                    f"{key}: the micro-batch of {shape.local_batch_size} sequences (at length "
                    f"{shape.seq_len}) must be divisible by "
                    f"parallelism.pipeline_parallel_microbatches={microbatches}"
                )
