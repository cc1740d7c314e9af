"""`deepen`: LLaMA Pro's zero-branch copies. Each listed layer gets a new layer right after it
whose residual writers (attention wo, FFN w2) are zero, so it adds nothing until it trains;
gradients reach those writers at the first step and the rest of the layer from the next."""

from dataclasses import dataclass, field

import torch

from arbor_titan.config.fields import option
from arbor_titan.growth.operator import (
    GrowthContext,
    GrowthOperator,
    ParamError,
    layer_name,
    replace_args,
    role_of,
    split_layer_name,
)
from arbor_titan.growth.values import WRITE, Values
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.registry import register

INITS = ("copy", "fresh")


@dataclass
class DeepenParams:
    layers: list[int] = field(
        metadata={"help": "insert a new layer right after each listed layer (0-based; repeats ok)"}
    )
    init: str = option(
        "copy",
        "'copy': the new layer's readers and gains copy the layer before it; 'fresh': random",
    )


@register("growth_operator", "deepen")
class Deepen(GrowthOperator):
    Params = DeepenParams

    def new_args(self, args: ArborArgs, params: DeepenParams) -> ArborArgs:
        if not params.layers:
            raise ParamError("layers", "list at least one layer to insert after")
        bad = [i for i in params.layers if not 0 <= i < args.n_layers]
        if bad:
            raise ParamError(
                "layers",
                f"{bad} out of range for a {args.n_layers}-layer model (0..{args.n_layers - 1})",
            )
        if params.init not in INITS:
            raise ParamError("init", f"must be one of {INITS}, got {params.init!r}")
        return replace_args(args, "deepen", n_layers=args.n_layers + len(params.layers))

    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        parsed = split_layer_name(name)
        if parsed is None:
            return {name: values.old(tensor)}
        index, suffix = parsed
        layers = ctx.params.layers
        first = index + sum(i < index for i in layers)  # earlier insertions shift this layer
        grown = {layer_name(first, suffix): values.old(tensor)}
        role = role_of(suffix)
        for k in range(1, layers.count(index) + 1):
            if role == WRITE:
                new = values.fresh(tensor.shape, tensor, WRITE)
            elif ctx.params.init == "copy":
                new = values.copy(tensor)
            else:
                new = values.fresh(tensor.shape, tensor, role)
            grown[layer_name(first + k, suffix)] = new
        return grown
