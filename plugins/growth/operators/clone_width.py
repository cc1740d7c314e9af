"""`clone_width`: HyperCloning x n. D, H, KV, F -> nD, nH, nKV, kF with head_dim unchanged.

The residual stream becomes [h, ..., h]; every reader is tiled and divided by the number of
input copies, every gain and the embedding are tiled (docs/growth.md, clone_width). Query heads
become h0..h(H-1), h0..., which keeps GQA consistent. A tied output projection is untied (rule
5): it must be divided by n while the embedding must not. Both untied matrices restart their
optimizer state (zero moments, step 0): the tied moments mix the two uses' gradients and can't
be split.

Symmetry breaking: each matrix that reads cloned inputs gets noise that sums to zero over the
copies of each input column, so the forward pass is unchanged (up to rounding) while the
copies' gradients differ. Without noise the copies would train identically forever.

Moments follow the gradient: with the stream cloned, each copy of an activation receives 1/n of
the old gradient (1/k inside the FFN), so e.g. wq's moments become tile(m)/n and tile(v)/n^2.
Under Adam, whose step ignores the gradient's scale, a weight divided by n then moves n times
faster relative to its size; a short lr re-warmup after cloning is the cure if that matters.
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
    unknown_tensor,
)
from arbor_titan.growth.values import Values
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.registry import register

QKV = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
WO, W1, W3, W2 = (
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "feed_forward.w2.weight",
)
EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"


@dataclass
class CloneWidthParams:
    factor: int = option(2, "n: copies of the hidden size, heads and kv heads")
    ffn_factor: int = option(0, "k: copies of the FFN units (0: same as factor)")
    noise: bool = option(True, "zero-sum symmetry-breaking noise on every cloned input")
    snr_db: float = option(10.0, "signal-to-noise ratio of that noise, in dB")


@register("growth_operator", "clone_width")
class CloneWidth(GrowthOperator):
    Params = CloneWidthParams

    def new_args(self, args: ArborArgs, params: CloneWidthParams) -> ArborArgs:
        if params.factor < 2:
            raise ParamError("factor", f"must be at least 2, got {params.factor}")
        if params.ffn_factor < 0 or params.ffn_factor == 1:
            raise ParamError(
                "ffn_factor", f"must be 0 (same as factor) or at least 2, got {params.ffn_factor}"
            )
        n = params.factor
        return replace_args(
            args,
            "clone_width",
            dim=args.dim * n,
            n_heads=args.n_heads * n,
            n_kv_heads=args.n_kv_heads * n,
            ffn_dim=args.ffn_dim * (params.ffn_factor or n),
            tie_embeddings=False,
        )

    def grow(
        self, name: str, tensor: torch.Tensor, values: Values, ctx: GrowthContext
    ) -> dict[str, torch.Tensor]:
        n = ctx.params.factor
        k = ctx.params.ffn_factor or n
        parsed = split_layer_name(name)
        suffix = parsed[1] if parsed else name
        if name == EMBEDDING:
            embedding = values.scaled(tensor.tile(1, n), weight_scale=1.0, grad_scale=1 / n)
            if not ctx.args.tie_embeddings:
                return {name: embedding}
            # Untied: the tied moments mix both uses' gradients, so both restart from zero.
            output = values.copy(values.scaled(tensor.tile(1, n), 1 / n, 1.0))
            return {name: values.copy(embedding), OUTPUT: self._noisy(output, values, ctx, n)}
        if suffix.endswith("norm.weight"):
            return {name: values.scaled(tensor.tile(n), weight_scale=1.0, grad_scale=1 / n)}
        # Matrices: (tile repeats, weight scale, gradient scale, copies of each input column).
        rules = {
            WO: ((n, n), 1 / n, 1 / n, n),
            W1: ((k, n), 1 / n, 1 / k, n),
            W3: ((k, n), 1 / n, 1 / k, n),
            W2: ((n, k), 1 / k, 1 / n, k),
            OUTPUT: ((1, n), 1 / n, 1.0, n),
        }
        if suffix in QKV:  # tiled per head, so each copy of the heads keeps whole heads
            hd, d = ctx.args.head_dim, tensor.shape[1]
            tiled = tensor.view(-1, hd, d).tile(n, 1, n).reshape(-1, d * n)
            grown = values.scaled(tiled, weight_scale=1 / n, grad_scale=1 / n)
            return {name: self._noisy(grown, values, ctx, n)}
        if suffix not in rules:
            raise unknown_tensor("clone_width", name)
        repeats, weight_scale, grad_scale, copies = rules[suffix]
        grown = values.scaled(tensor.tile(*repeats), weight_scale, grad_scale)
        return {name: self._noisy(grown, values, ctx, copies)}

    @staticmethod
    def _noisy(
        grown: torch.Tensor, values: Values, ctx: GrowthContext, copies: int
    ) -> torch.Tensor:
        """`grown` plus noise summing to zero over the `copies` clones of each input column."""
        if not ctx.params.noise:
            return grown
        width = grown.shape[-1] // copies
        groups = torch.arange(grown.shape[-1]) % width
        return grown + values.noise(grown, groups, ctx.params.snr_db)
