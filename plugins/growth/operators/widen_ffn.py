"""`widen_ffn`: FFN width F -> F'. Exact in both modes because SwiGLU acts unit by unit.

- zero: new rows of w1 and w3 random, new columns of w2 zero (the new units write nothing yet).
- split (Net2Net): new unit F+m duplicates unit m mod F and every copy of a unit writes
  `w2[:, j] / copies(j)`. Zero-sum noise over the copies' w2 columns (on by default) lets the
  copies' gradients differ; without it they would stay identical forever. The copies' w1/w3
  gradients are the old ones / copies(j), so their moments carry over scaled that way.
"""

from dataclasses import dataclass, field

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

MODES = ("zero", "split")
W1, W3, W2 = "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight"


@dataclass
class WidenFFNParams:
    ffn_dim: int = field(metadata={"help": "the new FFN width, larger than the current one"})
    mode: str = option("zero", "'zero' (new units write nothing) or 'split' (Net2Net copies)")
    noise: bool = option(True, "split: zero-sum noise on the copies' w2 columns (breaks symmetry)")
    snr_db: float = option(10.0, "split: signal-to-noise ratio of that noise, in dB")


@register("growth_operator", "widen_ffn")
class WidenFFN(GrowthOperator):
    Params = WidenFFNParams

    def new_args(self, args: ArborArgs, params: WidenFFNParams) -> ArborArgs:
        if params.ffn_dim <= args.ffn_dim:
            raise ParamError(
                "ffn_dim", f"must exceed the current ffn_dim {args.ffn_dim}, got {params.ffn_dim}"
            )
        if params.mode not in MODES:
            raise ParamError("mode", f"must be one of {MODES}, got {params.mode!r}")
        return replace_args(args, "widen_ffn", ffn_dim=params.ffn_dim)

    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        parsed = split_layer_name(name)
        if parsed is None or parsed[1] not in (W1, W3, W2):
            return {name: values.old(tensor)}
        suffix = parsed[1]
        old_width, new_width = ctx.args.ffn_dim, ctx.new_args.ffn_dim
        if ctx.params.mode == "zero":
            if suffix == W2:
                new = values.fresh((tensor.shape[0], new_width - old_width), tensor, WRITE)
                return {name: torch.cat([values.old(tensor), new], dim=1)}
            new = values.fresh((new_width - old_width, tensor.shape[1]), tensor, READ)
            return {name: torch.cat([values.old(tensor), new], dim=0)}
        source = torch.arange(new_width) % old_width  # the unit each new unit copies
        copies = torch.bincount(source, minlength=old_width)[source].to(torch.float64)
        source = source.to(tensor.device)
        share = (1.0 / copies).to(tensor.device, tensor.dtype)
        if suffix == W2:
            grown = values.scaled(tensor[:, source], weight_scale=share, grad_scale=1.0)
            if ctx.params.noise:
                grown = grown + values.noise(grown, source, ctx.params.snr_db)
            return {name: grown}
        return {name: values.scaled(tensor[source], weight_scale=1.0, grad_scale=share[:, None])}
