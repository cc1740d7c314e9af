"""`stack`: G_stack depthwise stacking, the whole layer list repeated `factor` times.

NOT function-preserving: the logits move by O(1) at the growth step. Reported the strongest
operator in practice (7B: the same loss with 194B instead of 300B tokens, Du et al. 2024); it is
also the negative control of the exactness tests. The copies are new tensors: their Adam moments
start at zero and their step at 0.
"""

from dataclasses import dataclass

import torch

from arbor_titan.config.fields import option
from arbor_titan.growth.operator import (
    GrowthContext,
    GrowthOperator,
    ParamError,
    layer_name,
    replace_args,
    split_layer_name,
)
from arbor_titan.growth.values import Values
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.registry import register


@dataclass
class StackParams:
    factor: int = option(2, "copies of the whole layer list (2 doubles the depth)")


@register("growth_operator", "stack")
class Stack(GrowthOperator):
    Params = StackParams
    exact = False

    def new_args(self, args: ArborArgs, params: StackParams) -> ArborArgs:
        if params.factor < 2:
            raise ParamError("factor", f"must be at least 2, got {params.factor}")
        return replace_args(args, "stack", n_layers=args.n_layers * params.factor)

    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        parsed = split_layer_name(name)
        if parsed is None:
            return {name: values.old(tensor)}
        index, suffix = parsed
        n_layers = ctx.args.n_layers
        grown = {name: values.old(tensor)}
        for copy in range(1, ctx.params.factor):
            grown[layer_name(index + copy * n_layers, suffix)] = values.copy(tensor)
        return grown
