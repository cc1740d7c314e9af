"""Survive a step that runs out of device memory: free, fall back, replay the same batch.

The fallbacks, from the run's settings on: more activation checkpointing (none → selective →
full), then half the micro-batch with twice the gradient accumulation, as often as the
micro-batch halves evenly. None of them changes what a step computes — the same tokens, the
same loss up to rounding — only its memory peak and its speed. Checkpoint wrappers go on before
compile and FSDP wrap the blocks, so they can't be swapped on the live model: each fallback
rebuilds it on the same mesh, as a growth stage does, with its weights, optimizer state and
learning-rate schedule. The data loader goes back to where the step began and reads its windows
again. After the last fallback the run stops with the dry-run planner's verdict on the settings
it reached.

Every rank must fail the same step, which ranks running the same shapes do. An out-of-memory
error on one rank alone leaves the others waiting inside the step's collectives, which no
process can take back; after `AGREE_TIMEOUT` the failed rank stops the job with that reason (a
launcher with restarts left resumes from the newest checkpoint). A fallback lasts until the run
ends: a resumed run starts at its configured settings again.
"""

import gc
import logging
import weakref
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from arbor_titan.checkpoint.stateful import FLAT
from arbor_titan.distributed.pipeline import num_microbatches
from arbor_titan.estimate.auto_ac import MODES_BY_COST, choose_for_training, with_mode
from arbor_titan.metrics.logger import MetricLogger

if TYPE_CHECKING:
    from arbor_titan.trainer import Trainer

logger = logging.getLogger("arbor_titan")

# Ranks that fail the same step reach the fallback within seconds of each other; a rank that has
# not arrived after this long is still waiting in one of the step's collectives, and never will.
AGREE_TIMEOUT = timedelta(seconds=120)
# The old model's state waits in host memory while the new model takes the device.
_ON_HOST = StateDictOptions(cpu_offload=True)
_ON_HOST_FLAT = StateDictOptions(cpu_offload=True, flatten_optimizer_state_dict=True)


class OutOfMemoryStop(RuntimeError):
    """A step ran out of memory and can't be replayed at any setting left."""


class NoFallbackLeft(Exception):
    """The last fallback is reached; the message says why nothing smaller exists."""


@dataclass(frozen=True)
class StepSettings:
    """What the fallbacks change: activation checkpointing and how a step's batch is split."""

    ac_mode: str
    local_batch_size: int
    gradient_accumulation_steps: int

    def fallback(self, batch_multiple: int = 1) -> "StepSettings":
        """The next setting: more checkpointing, else half the micro-batch with twice the
        accumulation (tokens per step unchanged); `batch_multiple` is what the micro-batch must
        stay divisible by (pipeline micro-batches). NoFallbackLeft when there is none."""
        if self.ac_mode != MODES_BY_COST[-1]:
            return replace(self, ac_mode=MODES_BY_COST[MODES_BY_COST.index(self.ac_mode) + 1])
        batch, half = self.local_batch_size, self.local_batch_size // 2
        if batch == 1:
            raise NoFallbackLeft("a micro-batch of 1 sequence can't be halved")
        if batch % 2:
            raise NoFallbackLeft(f"an odd micro-batch of {batch} sequences can't be halved")
        if half % batch_multiple:
            raise NoFallbackLeft(
                f"half the micro-batch, {half}, is not divisible by the "
                f"{batch_multiple} pipeline micro-batches (parallelism.pipeline_parallel_"
                "microbatches)"
            )
        return replace(
            self,
            local_batch_size=half,
            gradient_accumulation_steps=2 * self.gradient_accumulation_steps,
        )

    def __str__(self) -> str:
        return (
            f"activation_checkpoint.mode = {self.ac_mode!r}, training.local_batch_size = "
            f"{self.local_batch_size}, training.gradient_accumulation_steps = "
            f"{self.gradient_accumulation_steps}"
        )


def current_settings(trainer: "Trainer") -> StepSettings:
    """The settings the trainer's steps run at now (the micro-batch a context schedule set)."""
    cfg = trainer.cfg
    return StepSettings(
        cfg.activation_checkpoint.mode,
        trainer.local_batch_size,
        cfg.training.gradient_accumulation_steps,
    )


class OomFallback:
    """Runs each training step; one that raises `torch.OutOfMemoryError` before its optimizer
    update is replayed at the next fallback setting, until one fits or none is left."""

    def __init__(self, metrics: MetricLogger) -> None:
        self.metrics = metrics
        # A group of its own, with a timeout: the default group may hold the failed step's
        # collectives of ranks that didn't fail, and would pair them with this one.
        multi_rank = dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo", timeout=AGREE_TIMEOUT) if multi_rank else None
        self.fallbacks = 0
        self.split = 1  # the micro-batch is this many times smaller than the schedule's
        self.shape: tuple[int, int] | None = None  # (seq_len, micro-batch) the fallback set
        self.updating = False  # the step's optimizer update began: it can't be replayed
        self._watched: weakref.ref | None = None

    def step(self, trainer: "Trainer") -> tuple[torch.Tensor, torch.Tensor]:
        """`trainer.train_step()`, falling back and replaying it while it runs out of memory."""
        self._keep_split(trainer)
        start = trainer.train_loader.state_dict()
        while True:
            self._watch_updates(trainer.optimizer)
            try:
                return trainer.train_step()
            except torch.OutOfMemoryError as error:
                cause = str(error).strip().splitlines()[0]
            # Out of the except block, the traceback and the step's tensors it held are gone.
            self._fall_back(trainer, start, cause)

    def _fall_back(self, trainer: "Trainer", start: dict, cause: str) -> None:
        step, settings = trainer.state.step + 1, current_settings(trainer)
        free_memory(trainer)
        self._agree(step)
        failed = f"step {step} ran out of memory ({cause}) at {settings}"
        if self.updating:
            raise OutOfMemoryStop(
                f"training stopped: {failed}, in its optimizer update; some weights may already "
                f"have moved, so the step can't be replayed. {planner_advice(trainer)}"
            )
        pp = trainer.dims.pp
        try:
            fallback = settings.fallback(
                num_microbatches(trainer.cfg.parallelism, pp) if pp > 1 else 1
            )
        except NoFallbackLeft as last:
            raise OutOfMemoryStop(
                f"training stopped: {failed}, the last fallback ({last}). {planner_advice(trainer)}"
            ) from None
        apply_settings(trainer, fallback, start)
        if fallback.local_batch_size != settings.local_batch_size:
            self.split *= 2
        self.shape = (trainer.seq_len, trainer.local_batch_size)
        self.fallbacks += 1
        if trainer.proc.is_main:
            logger.warning(
                "%s: replaying it at %s (the same %d tokens); a run started at these settings "
                "needs no replay",
                failed,
                fallback,
                trainer.tokens_per_step,
            )
        trainer.metrics.log_event(step, "oom_fallback", {
            "fallback": self.fallbacks,
            "ac_mode": fallback.ac_mode,
            "local_batch_size": fallback.local_batch_size,
            "gradient_accumulation_steps": fallback.gradient_accumulation_steps,
            "tokens_per_step": trainer.tokens_per_step,
            "error": cause,
        })  # fmt: skip

    def _agree(self, step: int) -> None:
        """Wait until every rank has failed this step and freed its memory."""
        if self.group is None:
            return
        try:
            dist.monitored_barrier(self.group, timeout=AGREE_TIMEOUT, wait_all_ranks=True)
        except RuntimeError as missing:
            raise OutOfMemoryStop(
                f"step {step} ran out of memory on this rank but not on every rank ({missing}); "
                "the others wait in the step's collectives, so the ranks can't fall back "
                "together: restart from the newest checkpoint with more activation "
                "checkpointing or a smaller training.local_batch_size"
            ) from None

    def _keep_split(self, trainer: "Trainer") -> None:
        """A context schedule that changed the step's shape set its own micro-batch, sized for
        the configured accumulation: split it as the fallbacks did."""
        if self.split == 1 or (trainer.seq_len, trainer.local_batch_size) == self.shape:
            return
        batch = trainer.local_batch_size
        if batch % self.split:
            raise OutOfMemoryStop(
                f"the context schedule's micro-batch of {batch} sequences at length "
                f"{trainer.seq_len} can't be split in {self.split} as the out-of-memory "
                "fallbacks of this run did; restart with a training.local_batch_size and "
                "training.gradient_accumulation_steps that fit"
            )
        trainer.set_context(trainer.seq_len, batch // self.split, trainer.model_args.rope_scaling)
        self.shape = (trainer.seq_len, trainer.local_batch_size)

    def _watch_updates(self, optimizer: torch.optim.Optimizer) -> None:
        """Note whether this attempt reaches `optimizer.step()` (a rebuild brings a new one)."""
        self.updating = False
        if self._watched is None or self._watched() is not optimizer:
            optimizer.register_step_pre_hook(self._mark_update)
            self._watched = weakref.ref(optimizer)

    def _mark_update(self, *_) -> None:
        self.updating = True


def free_memory(trainer: "Trainer") -> None:
    """Drop the failed step's gradients and gathered FSDP weights, then the cached blocks."""
    trainer.optimizer.zero_grad(set_to_none=True)
    parts = [trainer.model] + (trainer.pipeline.parts if trainer.pipeline is not None else [])
    for part in parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    gc.collect()
    if trainer.proc.device.type == "cuda":
        torch.cuda.empty_cache()


def apply_settings(trainer: "Trainer", settings: StepSettings, start: dict) -> None:
    """Train from the step's start at `settings`: the model rebuilt for the checkpointing mode
    and accumulation (pipeline schedules scale their loss by it), the loader rewound to
    `start` (a `state_dict()` taken before the step) and cut into the new micro-batch."""
    cfg = with_mode(trainer.cfg, settings.ac_mode)
    trainer.cfg = replace(
        cfg,
        training=replace(
            cfg.training, gradient_accumulation_steps=settings.gradient_accumulation_steps
        ),
    )
    rebuild_keeping_state(trainer)
    trainer.train_loader.load_state_dict(start)
    rope = trainer.model_args.rope_scaling
    trainer.set_context(trainer.seq_len, settings.local_batch_size, rope)


def rebuild_keeping_state(trainer: "Trainer") -> None:
    """Rebuild the model and optimizer from `trainer.cfg` with the same weights, optimizer
    state and learning rate."""
    weights = get_model_state_dict(trainer.model, options=_ON_HOST)
    moments = None
    # Before the first update an optimizer has no state; asking DCP for it would create it
    # with one (zero-learning-rate) step counted, and shift Adam's bias correction.
    if trainer.optimizer.state:
        moments = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=_ON_HOST_FLAT)
    # The schedule's current rate (a fresh optimizer starts at its first) and its factors: a
    # growth re-warmup's ramp lives there, and a scheduler's state_dict doesn't carry it.
    lrs = [group["lr"] for group in trainer.optimizer.param_groups]
    factors = trainer.lr_scheduler.lr_lambdas
    trainer.rebuild_model(trainer.model_args)
    trainer.lr_scheduler.lr_lambdas = factors
    set_model_state_dict(trainer.model, weights)
    if moments is not None:
        set_optimizer_state_dict(trainer.model, trainer.optimizer, moments, options=FLAT)
    for group, lr in zip(trainer.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def planner_advice(trainer: "Trainer") -> str:
    """The dry-run planner's verdict on the settings that ran out of memory: each activation
    checkpointing mode's planned peak against the memory budget, and what else to lower."""
    training = replace(
        trainer.cfg.training, seq_len=trainer.seq_len, local_batch_size=trainer.local_batch_size
    )
    cfg, capacity = replace(trainer.cfg, training=training), trainer.memory_watch.capacity_gib
    try:
        _, reason = choose_for_training(
            cfg, trainer.proc.world_size, capacity, trainer.proc.device.type
        )
    except ValueError as verdict:
        # Its message speaks of the mode it was choosing: here every mode is out of budget.
        verdict = str(verdict).removeprefix("activation_checkpoint.mode = auto: ")
        return f"The planner at these settings: {verdict}"
    return (
        f"The planner at these settings expected a fit ({reason}), so it underestimates this "
        "run: set training.memory_budget_gib below the device's memory to plan with headroom, "
        "lower training.seq_len, set training.loss_chunk_len or use more ranks"
    )
