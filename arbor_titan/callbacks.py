"""Named hooks through which validation, checkpointing, growth and context schedules enter the
training loop, so the step itself never grows `if` chains."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from arbor_titan.models.arbor.args import ArborArgs
    from arbor_titan.trainer import Trainer


class Callback:
    """Override what you need; every hook receives the trainer and may read its state."""

    def on_model_args(self, trainer: "Trainer", args: "ArborArgs") -> "ArborArgs":
        """Before the model is built: the args to build it with (a resumed grown model differs
        from its flavor)."""
        return args

    def on_train_start(self, trainer: "Trainer") -> None:
        """After the model, optimizer and data are built, before the first step."""

    def on_step_start(self, trainer: "Trainer") -> None:
        """Before each optimizer step, `trainer.state.step` steps done (after a resume too)."""

    def on_step_end(self, trainer: "Trainer") -> None:
        """After optimizer step `trainer.state.step` (already incremented) and its logging."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """After the last step, also when training stops early."""
