"""`add_heads`: (H, KV) -> (H + aG, KV + a) with head_dim unchanged (docs/growth.md, rule 4).

Query heads are appended in whole GQA groups together with their kv head, so every old query
head keeps its kv head (head h reads kv head h // G). The new heads' readers (rows of wq, wk, wv)
are random and their writer (the new input columns of wo) is zero.
"""

from dataclasses import dataclass

import torch

from arbor_titan.config.fields import option
from arbor_titan.growth.operator import (
    GrowthContext,
    GrowthOperator,
    ParamError,
    replace_args,
    split_layer_name,
)
from arbor_titan.growth.values import READ, WRITE, Values
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.registry import register

WQ, WK, WV, WO = (f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo"))


@dataclass
class AddHeadsParams:
    kv_heads: int = option(
        1, "kv heads to add; each brings its whole group of n_heads // n_kv_heads query heads"
    )


@register("growth_operator", "add_heads")
class AddHeads(GrowthOperator):
    Params = AddHeadsParams

    def new_args(self, args: ArborArgs, params: AddHeadsParams) -> ArborArgs:
        if params.kv_heads < 1:
            raise ParamError("kv_heads", f"must be at least 1, got {params.kv_heads}")
        group = args.n_heads // args.n_kv_heads
        return replace_args(
            args,
            "add_heads",
            n_heads=args.n_heads + params.kv_heads * group,
            n_kv_heads=args.n_kv_heads + params.kv_heads,
        )

    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        parsed = split_layer_name(name)
        if parsed is None or parsed[1] not in (WQ, WK, WV, WO):
            return {name: values.old(tensor)}
        suffix, old, new = parsed[1], ctx.args, ctx.new_args
        if suffix == WO:
            added = (new.n_heads - old.n_heads) * old.head_dim
            zeros = values.fresh((tensor.shape[0], added), tensor, WRITE)
            return {name: torch.cat([values.old(tensor), zeros], dim=1)}
        heads = new.n_heads - old.n_heads if suffix == WQ else new.n_kv_heads - old.n_kv_heads
        rows = values.fresh((heads * old.head_dim, tensor.shape[1]), tensor, READ)
        return {name: torch.cat([values.old(tensor), rows], dim=0)}
