"""RoPE at inference: the cos/sin table a KV cache uses, the context length a model's scaling
reaches, and the command line's change of scaling (`--rope-scaling`, `--rope-factor`,
`--rope-param`) that lets a model run past its training length.
"""

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import torch

from arbor_titan import registry
from arbor_titan.config.loader import ConfigError
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.rope import RopeScaling, build_rope_scaling, rope_cos_sin

ORIGINAL_LENGTH = "original_max_seq_len"


def rope_table(args: ArborArgs, length: int) -> torch.Tensor:
    """fp32 cos/sin of shape (2, length, head_dim) for positions 0..length-1 under the args'
    scaling, past `max_seq_len` if asked.

    A length-dependent scaling (`dynamic_ntk`) is evaluated once, for the whole `length` (the
    KV cache's): a key enters the cache already rotated, and a cached key can't be re-rotated
    when the sequence grows, so one table must serve every position the cache will hold.
    """
    return rope_cos_sin(args.head_dim, length, args.rope_theta, args.rope_scaling)


def _pretrained_length(args: ArborArgs, scaling: RopeScaling | None) -> int:
    """The length the model was trained at before any RoPE extension."""
    return (
        getattr(scaling.params, ORIGINAL_LENGTH, args.max_seq_len) if scaling else args.max_seq_len
    )


def _reach(scaling: RopeScaling, pretrained: int) -> int:
    """The length a scaling is meant to reach: its pre-extension length (else `pretrained`)
    times its factor."""
    base = getattr(scaling.params, ORIGINAL_LENGTH, pretrained)
    return round(base * getattr(scaling.params, "factor", 1.0))


def context_length(args: ArborArgs) -> int:
    """How many positions the model is meant for: its training length, or longer where its
    scaling extends its original length (original_max_seq_len × factor)."""
    scaling = build_rope_scaling(args.rope_scaling)
    if scaling is None or not hasattr(scaling.params, ORIGINAL_LENGTH):
        return args.max_seq_len
    return max(args.max_seq_len, _reach(scaling, args.max_seq_len))


@dataclass(frozen=True)
class RopeOverride:
    """The command line's change to a checkpoint's RoPE scaling.

    `scaling`: a rope_scaling name, "none" for plain RoPE, or None to keep the checkpoint's
    scaling and change only its `params` (from --rope-factor and --rope-param).
    """

    scaling: str | None
    params: dict[str, Any]

    def apply(self, args: ArborArgs) -> ArborArgs:
        """`args` with the new scaling and the max length it reaches: the pre-extension length
        (given, or the checkpoint's) × factor, never below the training length."""
        if self.scaling == "none":
            if self.params:
                raise ValueError(
                    "--rope-scaling none: plain RoPE takes no --rope-factor/--rope-param"
                )
            return replace(args, rope_scaling=None)
        current = build_rope_scaling(args.rope_scaling)
        if self.scaling is None:
            if current is None:
                raise ValueError(
                    "--rope-factor/--rope-param change the checkpoint's RoPE scaling, but it has "
                    f"none: name one with --rope-scaling ({', '.join(_choices())})"
                )
            settings = {**args.rope_scaling, **self.params}
        else:
            settings = {"type": self.scaling, **self.params}
        try:
            plugin_cls = registry.get("rope_scaling", settings["type"])
        except registry.PluginError as err:
            raise ValueError(f"--rope-scaling: {err}, or 'none' for plain RoPE") from None
        pretrained = _pretrained_length(args, current)
        if any(f.name == ORIGINAL_LENGTH for f in dataclasses.fields(plugin_cls.Params)):
            settings.setdefault(ORIGINAL_LENGTH, pretrained)
        try:
            scaling = build_rope_scaling(settings, "--rope-param")
        except ConfigError as err:
            raise ValueError(str(err)) from None
        max_seq_len = max(args.max_seq_len, _reach(scaling, pretrained))
        return replace(args, rope_scaling=settings, max_seq_len=max_seq_len)


def _choices() -> list[str]:
    return [*registry.names("rope_scaling"), "none"]
