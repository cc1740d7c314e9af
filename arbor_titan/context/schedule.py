"""What a context schedule is: the shape of every training step — its sequence length, its
micro-batch and its RoPE scaling.

Before each optimizer step the trainer asks `shape(step)`, `step` being the number of steps
already taken (0 before the first); when the answer differs from the last one, the data re-packs
from its position, the step's token count and FLOPs follow, and a new scaling replaces the RoPE
table. `shapes()` lists every shape the schedule can answer, so a length that the layout or the
token budget can't take fails before step 0, and the model's RoPE table is sized for the longest.
A schedule may read the loss (`observe`); its `state_dict` goes into every checkpoint, so a
resumed run answers the same shapes. Implementations are `context_schedule` plugins (the
built-ins live in plugins/context/schedules.py).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from arbor_titan.config.loader import ConfigError

# Where every schedule's params come from; errors print keys below it.
PARAMS_KEY = "context.schedule_params"


@dataclass(frozen=True)
class ContextShape:
    """One step's shape: `seq_len` tokens per sequence, `local_batch_size` sequences per
    micro-batch on each data-parallel rank, and RoPE scaling settings (None: plain RoPE)."""

    seq_len: int
    local_batch_size: int
    rope: dict | None = None

    def fields(self) -> dict[str, Any]:
        """As an event's fields (metrics.jsonl, TensorBoard, console)."""
        return {
            "seq_len": self.seq_len,
            "local_batch_size": self.local_batch_size,
            "rope": self.rope,
        }


@dataclass
class NoScheduleParams:
    """For schedules without parameters."""


class ScheduleParamError(ValueError):
    """A bad schedule parameter; `key` is its path below `context.schedule_params`
    (`stages[1].seq_len`), so the error can name the full key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class ContextSchedule(ABC):
    """Subclass, set `Params` (a dataclass: its fields are the schedule's TOML keys), implement
    `shape` and `shapes`, and register with `@register("context_schedule", "name")`.

    `base` is the configured shape: `training.seq_len`, `training.local_batch_size` and the
    `[context]` scaling. Build shapes with `shape_for(seq_len, rope)` so that
    `keep_tokens_per_step` holds; a schedule that picks its own micro-batch may bypass it.
    """

    Params: ClassVar[type] = NoScheduleParams
    # Whether `observe` is used: the trainer reduces the loss across ranks for it only then.
    reads_loss: ClassVar[bool] = False

    def __init__(self, base: ContextShape, params: Any, keep_tokens_per_step: bool = False):
        self.base, self.params, self.keep_tokens_per_step = base, params, keep_tokens_per_step

    @abstractmethod
    def shape(self, step: int) -> ContextShape:
        """The shape of the step that follows `step` optimizer steps (0: the first step)."""

    @abstractmethod
    def shapes(self) -> list[ContextShape]:
        """Every shape `shape` can answer (in any order; repeats allowed)."""

    @property
    def max_seq_len(self) -> int:
        """The longest length of the run: the model's RoPE table covers it."""
        return max(shape.seq_len for shape in self.shapes())

    def observe(self, step: int, loss: float) -> None:  # noqa: B027 - optional hook
        """Record the training loss of optimizer step `step` (called when `reads_loss`)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - stateless by default
        """Restore what `state_dict` returned."""

    def shape_for(self, seq_len: int, rope: dict | None) -> ContextShape:
        """A shape of `seq_len`: with `keep_tokens_per_step`, as many sequences as keep the
        configured tokens per micro-batch; otherwise the configured micro-batch."""
        if not self.keep_tokens_per_step:
            return ContextShape(seq_len, self.base.local_batch_size, rope)
        tokens = self.base.seq_len * self.base.local_batch_size
        if tokens % seq_len:
            raise ConfigError(
                f"context.keep_tokens_per_step: a micro-batch of training.seq_len="
                f"{self.base.seq_len} x training.local_batch_size={self.base.local_batch_size} = "
                f"{tokens} tokens can't be cut into sequences of the schedule's length {seq_len}; "
                "choose lengths that divide it, or set keep_tokens_per_step = false"
            )
        return ContextShape(seq_len, tokens // seq_len, rope)
