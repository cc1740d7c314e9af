"""What a growth operator is: new model args plus a rule that grows one tensor at a time.

Operators see a single tensor (a weight or an optimizer moment, told apart only by the `Values`
they are handed), so the same rule serves live growth under any parallelism and offline growth of
a checkpoint, and no operator ever needs the whole model in memory.
"""

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from arbor_titan.growth.values import GAIN, READ, WRITE, Values
from arbor_titan.models.arbor.args import ArborArgs

LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
WRITERS = ("attention.wo.weight", "feed_forward.w2.weight")
GAINS = ("attention_norm.weight", "ffn_norm.weight")


class GrowthError(ValueError):
    """A growth that cannot be applied to this model (or that an operator got wrong)."""


class ParamError(GrowthError):
    """A bad operator or schedule parameter; `key` names it so the caller can print its full path
    (`growth.stages[0].params.layers`)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class NoParams:
    """For operators and schedules that take no parameters."""


@dataclass(frozen=True)
class GrowthContext:
    """What an operator knows while it grows a tensor: the shapes before and after, its params."""

    args: ArborArgs
    new_args: ArborArgs
    params: Any


class GrowthOperator(ABC):
    """Subclass, set `Params` (a dataclass: its fields are the operator's TOML keys), implement
    `new_args` and `grow`, and register with `@register("growth_operator", "name")`.

    `grow` must route every old entry through `values` (`old`, `scaled`, `copy`) and create every
    new one with `values.fresh` or `values.noise`; plain tensor reshaping (cat, tile, view,
    indexing) is fine. That is what lets the same body grow Adam moments and per-tensor steps.
    """

    Params: ClassVar[type] = NoParams
    # Function-preserving: the grown model computes the same logits. `stack` is the exception.
    exact: ClassVar[bool] = True

    @abstractmethod
    def new_args(self, args: ArborArgs, params: Any) -> ArborArgs:
        """The grown model's args; raise `ParamError(key, why)` for params this model can't take."""

    @abstractmethod
    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        """The grown model's tensors made from the parameter `name` (one, or several for depth)."""


def split_layer_name(name: str) -> tuple[int, str] | None:
    """`layers.3.attention.wq.weight` -> (3, 'attention.wq.weight'); None outside the layers."""
    match = LAYER_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def layer_name(index: int, suffix: str) -> str:
    return f"layers.{index}.{suffix}"


def role_of(suffix: str) -> str:
    """READ, WRITE or GAIN for a parameter inside a block (docs/growth.md, "Roles" and rule 1)."""
    if suffix in WRITERS:
        return WRITE
    if suffix in GAINS:
        return GAIN
    return READ


def replace_args(args: ArborArgs, op: str, **changes: Any) -> ArborArgs:
    """`dataclasses.replace` that keeps head_dim fixed (rule 4), or says why it cannot.

    Today's ArborArgs derives head_dim = dim // n_heads; operators that change dim and n_heads
    independently (add_heads, widen_hidden) need an explicit `head_dim` field.
    """
    if any(f.name == "head_dim" for f in dataclasses.fields(args)):
        changes.setdefault("head_dim", args.head_dim)
    new = dataclasses.replace(args, **changes)
    if new.head_dim != args.head_dim:
        raise GrowthError(
            f"{op}: {type(args).__name__} derives head_dim from dim // n_heads, so growing "
            f"dim {args.dim}->{new.dim} with n_heads {args.n_heads}->{new.n_heads} would change "
            f"head_dim {args.head_dim}->{new.head_dim}; this operator needs model args with an "
            "explicit head_dim field"
        )
    return new


def unknown_tensor(op: str, name: str) -> GrowthError:
    return GrowthError(f"{op}: does not know how to grow parameter {name!r}")
