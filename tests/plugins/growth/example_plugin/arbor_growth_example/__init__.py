"""Example growth plugin: `deepen_last` appends copies of the last layer whose residual writers
(attention wo, FFN w2) start at zero, so the grown model computes exactly what it did.

    [[growth.stages]]
    at_step = 1000
    op = "deepen_last"
    params = { count = 2 }
"""

from dataclasses import dataclass

import torch

from arbor_titan.config.fields import option
from arbor_titan.growth import (
    WRITE,
    GrowthContext,
    GrowthOperator,
    ParamError,
    Values,
    layer_name,
    replace_args,
    role_of,
    split_layer_name,
)
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.registry import register


@dataclass
class DeepenLastParams:
    count: int = option(1, "copies of the last layer to append")


@register("growth_operator", "deepen_last")
class DeepenLast(GrowthOperator):
    Params = DeepenLastParams

    def new_args(self, args: ArborArgs, params: DeepenLastParams) -> ArborArgs:
        if params.count < 1:
            raise ParamError("count", f"must be at least 1, got {params.count}")
        return replace_args(args, "deepen_last", n_layers=args.n_layers + params.count)

    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        grown = {name: values.old(tensor)}
        parsed = split_layer_name(name)
        if parsed is None or parsed[0] != ctx.args.n_layers - 1:
            return grown
        suffix = parsed[1]
        for k in range(ctx.params.count):
            if role_of(suffix) == WRITE:
                copy = values.fresh(tensor.shape, tensor, WRITE)  # writes nothing until it trains
            else:
                copy = values.copy(tensor)
            grown[layer_name(ctx.args.n_layers + k, suffix)] = copy
        return grown
