"""`widen_hidden`: hidden size d -> D' by zero padding (Masked Structural Growth at mask 0).

The embedding and the residual writers (wo, w2) get zero new columns/rows, so the new residual
dimensions stay zero; readers (wq, wk, wv, w1, w3, output) get random new columns. Zero padding
divides every RMSNorm's mean(h^2) by D'/d, so the gains are rescaled by sqrt(d/D') and eps by
d/D' (docs/growth.md, rule 3); without that the logits move by O(1). The rescaled gains' gradients
grow by sqrt(D'/d), and their moments with them. A tied output projection is untied: as a reader
its new columns must be random while the embedding's must be zero (rules 1 and 2); both untied
matrices restart their optimizer state, since the tied moments mix both uses' gradients. Heads
and head_dim are unchanged, so this needs model args with an explicit head_dim.
"""

import math
from dataclasses import dataclass, field

import torch

from arbor_titan.config.fields import option
from arbor_titan.growth.operator import (
    GrowthContext,
    GrowthOperator,
    ParamError,
    replace_args,
    role_of,
    split_layer_name,
    unknown_tensor,
)
from arbor_titan.growth.values import GAIN, READ, WRITE, Values
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.registry import register

EMBEDDING, OUTPUT, FINAL_NORM = "tok_embeddings.weight", "output.weight", "norm.weight"


@dataclass
class WidenHiddenParams:
    dim: int = field(metadata={"help": "the new hidden size, larger than the current one"})
    rescale_norms: bool = option(
        True, "rescale RMSNorm gains and eps for the padded dims (false breaks exactness)"
    )


@register("growth_operator", "widen_hidden")
class WidenHidden(GrowthOperator):
    Params = WidenHiddenParams

    def new_args(self, args: ArborArgs, params: WidenHiddenParams) -> ArborArgs:
        if params.dim <= args.dim:
            raise ParamError("dim", f"must exceed the current dim {args.dim}, got {params.dim}")
        ratio = args.dim / params.dim if params.rescale_norms else 1.0
        return replace_args(
            args,
            "widen_hidden",
            dim=params.dim,
            norm_eps=args.norm_eps * ratio,
            tie_embeddings=False,
        )

    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        added = ctx.new_args.dim - ctx.args.dim
        if name == EMBEDDING:  # the first writer of the residual stream
            zeros = values.fresh((tensor.shape[0], added), tensor, WRITE)
            if not ctx.args.tie_embeddings:
                return {name: torch.cat([values.old(tensor), zeros], dim=1)}
            # Untied: the output reads the new dims at random; both restart their moments.
            random = values.fresh((tensor.shape[0], added), tensor, READ)
            return {
                name: torch.cat([values.copy(tensor), zeros], dim=1),
                OUTPUT: torch.cat([values.copy(tensor), random], dim=1),
            }
        role = _role(name)
        if role == READ:
            new = values.fresh((tensor.shape[0], added), tensor, READ)
            return {name: torch.cat([values.old(tensor), new], dim=1)}
        if role == WRITE:
            new = values.fresh((added, tensor.shape[1]), tensor, WRITE)
            return {name: torch.cat([values.old(tensor), new], dim=0)}
        new = values.fresh((added,), tensor, GAIN)
        if not ctx.params.rescale_norms:
            return {name: torch.cat([values.old(tensor), new])}
        gain = math.sqrt(ctx.args.dim / ctx.new_args.dim)
        return {name: torch.cat([values.scaled(t, gain, 1 / gain) for t in (tensor, new)])}


def _role(name: str) -> str:
    if name == OUTPUT:
        return READ
    if name == FINAL_NORM:
        return GAIN
    parsed = split_layer_name(name)
    if parsed is None:
        raise unknown_tensor("widen_hidden", name)
    return role_of(parsed[1])
