"""The trainer's hook for `[float8]`; the conversion itself lives in `distributed/float8.py`,
which knows nothing of the trainer."""

from typing import TYPE_CHECKING

from arbor_titan.callbacks import Callback
from arbor_titan.distributed.float8 import Float8Config

if TYPE_CHECKING:
    from arbor_titan.trainer import Trainer


class Float8ScalePrecompute(Callback):
    """After each optimizer step, compute every float8 weight scale in one all-reduce, so the
    next step's FSDP2 float8 all-gathers don't each reduce their own amax."""

    def on_step_end(self, trainer: "Trainer") -> None:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(trainer.model)


def float8_callbacks(cfg: Float8Config) -> list[Callback]:
    """The hooks the trainer registers for `[float8]`."""
    if cfg.enable_float8_linear and cfg.precompute_float8_dynamic_scale_for_fsdp:
        return [Float8ScalePrecompute()]
    return []
