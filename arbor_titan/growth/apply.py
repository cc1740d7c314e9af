"""One growth event bound to a model shape, applied tensor by tensor to weights and to optimizer
state (the `get_optimizer_state_dict` format), live or offline.

Optimizer state (see plugins/README.md, "Optimizer state"): moments follow the gradient (old
slices keep their moments, new entries start at zero, cloned or split entries carry the scaled
moments); `step` is per tensor: a tensor made only of new entries starts at 0 so Adam's bias
correction starts fresh, a tensor that still holds old entries keeps its step.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from arbor_titan import registry
from arbor_titan.config.loader import ConfigError
from arbor_titan.config.params import parse_params
from arbor_titan.growth.config import INITS
from arbor_titan.growth.operator import GrowthContext, GrowthError, GrowthOperator, ParamError
from arbor_titan.growth.values import GAIN, READ, AgeValues, MomentValues, WeightValues
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.model import Transformer

# Adam's state entries that are moments of the gradient, with the power of the gradient they hold.
MOMENT_POWERS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
STEP = "step"


def param_shapes(args: ArborArgs) -> dict[str, torch.Size]:
    """Every parameter's name and shape for `args`, from a model built on meta (no memory)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: p.shape for name, p in model.named_parameters()}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class Growth:
    """An operator with validated params, applied to models of shape `args`.

    Creating one checks, on the meta device, that the operator turns exactly the parameters of
    `args` into exactly the parameters of `new_args` with their shapes, so a wrong operator or
    param fails before any real tensor is touched.
    """

    def __init__(
        self,
        op: GrowthOperator,
        params: Any,
        args: ArborArgs,
        seed: int = 0,
        init: str = "operator",
    ):
        if init not in INITS:
            raise GrowthError(f"growth.init must be one of {INITS}, got {init!r}")
        self.op, self.seed, self.init = op, seed, init
        self.name = type(op).__name__
        new_args = op.new_args(args, params)
        new_args.validate()
        self.ctx = GrowthContext(args=args, new_args=new_args, params=params)
        self._old_shapes = param_shapes(args)
        self._outputs = self._plan_outputs()

    @classmethod
    def create(
        cls,
        op_name: str,
        args: ArborArgs,
        params: dict,
        seed: int = 0,
        where: str = "growth",
        init: str = "operator",
    ) -> "Growth":
        """The registered operator `op_name` with TOML-style `params`; errors name
        `{where}.op` or `{where}.params.<key>`. `init` is `growth.init`."""
        try:
            op_cls = registry.get("growth_operator", op_name)
        except registry.PluginError as err:
            raise ConfigError(f"{where}.op: {err}") from None
        parsed = parse_params(op_cls.Params, params, f"{where}.params", op_name)
        try:
            return cls(op_cls(), parsed, args, seed, init)
        except ParamError as err:
            raise ConfigError(f"{where}.params.{err.key}: {op_name}: {err}") from None
        except GrowthError as err:
            raise ConfigError(f"{where}: {err}") from None

    @property
    def args(self) -> ArborArgs:
        return self.ctx.args

    @property
    def new_args(self) -> ArborArgs:
        return self.ctx.new_args

    def param_names(self) -> list[str]:
        """The parameters of the model being grown, in the model's order."""
        return list(self._old_shapes)

    # -- one tensor

    def grow_param(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The grown model's parameters made from parameter `name`."""
        values = WeightValues(self.seed, name)
        grown = self._grow(name, tensor, values)
        role = GAIN if tensor.dim() == 1 else READ  # random init: nothing is zeroed, no writer
        return self._randomized(name, tensor, grown, lambda s: values.fresh(s, tensor, role))

    def grow_moment(self, name: str, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """An Adam moment (`exp_avg`, `exp_avg_sq`) of parameter `name`, grown like the weight."""
        if key not in MOMENT_POWERS:
            known = ", ".join([*MOMENT_POWERS, STEP])
            raise GrowthError(f"optimizer state {name}.{key}: unknown entry; known: {known}")
        grown = self._grow(name, tensor, MomentValues(MOMENT_POWERS[key]))
        return self._randomized(name, tensor, grown, tensor.new_zeros)

    def grow_step(self, name: str, step: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter `name`'s Adam step for each grown tensor: 0 where all entries are new."""
        return {
            new_name: torch.zeros_like(step) if is_new.all() else step.clone()
            for new_name, is_new in self.new_entries(name).items()
        }

    def grow_state_entry(self, name: str, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer state entry (moment or step) of parameter `name`."""
        return self.grow_step(name, value) if key == STEP else self.grow_moment(name, key, value)

    def new_entries(self, name: str) -> dict[str, torch.Tensor]:
        """For each tensor grown from parameter `name`, a bool mask of its new entries."""
        old = torch.ones(self._shape_of(name), dtype=torch.bool)
        carried = self._randomized(name, old, self._grow(name, old, AgeValues()), old.new_zeros)
        return {new_name: ~mask.bool() for new_name, mask in carried.items()}

    def output_shapes(self, name: str) -> dict[str, torch.Size]:
        """Names and shapes of the tensors grown from parameter `name` (no computation)."""
        self._shape_of(name)
        return self._outputs[name]

    def rename(self, names: Iterable[str]) -> list[str]:
        """Parameter names after growth, each old name followed by the new ones made from it."""
        return [new_name for name in names for new_name in self.output_shapes(name)]

    # -- whole state dicts

    def iter_model_state(
        self, items: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Grown (name, tensor) pairs, one source tensor at a time (sharded ones gathered whole)."""
        for name, tensor in items:
            yield from self.grow_param(name, full_tensor(tensor)).items()

    def model_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A grown model state dict (`get_model_state_dict` names) of full tensors."""
        return dict(self.iter_model_state(state.items()))

    def optimizer_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A grown `get_optimizer_state_dict(model, optimizer)`: per-parameter state keyed by
        name, and param groups whose `params` lists gain the new names beside their sources."""
        grown: dict[str, dict[str, torch.Tensor]] = {}
        for name, entries in state["state"].items():
            for key, value in entries.items():
                for new_name, tensor in self.grow_state_entry(
                    name, key, full_tensor(value)
                ).items():
                    grown.setdefault(new_name, {})[key] = tensor
        groups = [
            {**group, "params": self.rename(group["params"])} for group in state["param_groups"]
        ]
        return {"state": grown, "param_groups": groups}

    # -- internals

    def _grow(self, name: str, tensor: torch.Tensor, values: Any) -> dict[str, torch.Tensor]:
        expected = self._shape_of(name)
        if tensor.shape != expected:
            raise GrowthError(
                f"{name}: shape {tuple(tensor.shape)} does not match the model "
                f"({tuple(expected)}) that this growth was built for"
            )
        return self.op.grow(name, tensor, values, self.ctx)

    def _randomized(
        self,
        name: str,
        tensor: torch.Tensor,
        grown: dict[str, torch.Tensor],
        fresh: Callable[[torch.Size], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """`grown` itself under `init = "operator"`. Under "random", only its names and shapes
        count: a grown tensor that carries old entries becomes `tensor` in its leading block and
        `fresh` elsewhere, one made only of new entries (a new layer) is all `fresh`. For weights
        `fresh` is random (READ) or 1 (GAIN), for moments and masks 0: old entries keep their
        Adam state, new ones start from none."""
        if self.init == "operator":
            return grown
        ones = torch.ones(self._shape_of(name), dtype=torch.bool)
        holds_old = {n: bool(m.any()) for n, m in self._grow(name, ones, AgeValues()).items()}
        block = tuple(slice(0, size) for size in tensor.shape)
        randomized = {}
        for new_name, t in grown.items():
            new = fresh(t.shape)
            if holds_old[new_name]:
                new[block] = tensor
            randomized[new_name] = new
        return randomized

    def _shape_of(self, name: str) -> torch.Size:
        if name not in self._old_shapes:
            raise GrowthError(f"{name!r} is not a parameter of the model being grown")
        return self._old_shapes[name]

    def _plan_outputs(self) -> dict[str, dict[str, torch.Size]]:
        """Each parameter's grown names and shapes, from the operator run on meta tensors, checked
        against a model built from `new_args`."""
        outputs: dict[str, dict[str, torch.Size]] = {}
        made: dict[str, torch.Size] = {}
        for name, shape in self._old_shapes.items():
            meta = torch.empty(shape, device="meta")
            grown = self.op.grow(name, meta, WeightValues(self.seed, name), self.ctx)
            outputs[name] = {new_name: t.shape for new_name, t in grown.items()}
            for new_name, new_shape in outputs[name].items():
                if new_name in made:
                    raise GrowthError(f"{self.name}: makes {new_name!r} twice")
                made[new_name] = new_shape
        expected = param_shapes(self.new_args)
        if made != expected:
            raise GrowthError(f"{self.name}: {_shape_mismatch(made, expected)}")
        return outputs


def _shape_mismatch(made: dict[str, torch.Size], expected: dict[str, torch.Size]) -> str:
    missing = sorted(set(expected) - set(made))
    extra = sorted(set(made) - set(expected))
    wrong = [
        f"{k} {tuple(made[k])} (model expects {tuple(expected[k])})"
        for k in sorted(set(made) & set(expected))
        if made[k] != expected[k]
    ]
    parts = [
        f"missing {', '.join(missing[:4])}" if missing else "",
        f"unexpected {', '.join(extra[:4])}" if extra else "",
        f"wrong shape {', '.join(wrong[:4])}" if wrong else "",
    ]
    return "grown tensors do not match the grown model: " + "; ".join(p for p in parts if p)
