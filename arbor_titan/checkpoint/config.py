"""The `[checkpoint]` section (TorchTitan's key names)."""

from dataclasses import dataclass

from arbor_titan.config.fields import option

ASYNC_MODES = ("disabled", "async")


@dataclass
class CheckpointConfig:
    enable: bool = option(True, "Save checkpoints and resume from the newest one.")
    folder: str = option("checkpoints", "Folder under <dump_folder>/<job.name>/.")
    interval: int = option(100, "Save every this many steps (and always at the last step).")
    keep_latest_k: int = option(0, "Keep only the newest k complete checkpoints (0 keeps all).")
    async_mode: str = option("disabled", "disabled, or async: write while training goes on.")
    load_step: int = option(-1, "Step to resume from; -1 = newest complete checkpoint.")
    initial_load_path: str = option(
        "", "With no checkpoint of this job yet: a DCP folder whose model weights start the run."
    )
    model_weights_only: bool = option(
        False, "Save the final checkpoint with model weights only (smaller; cannot resume)."
    )

    def __post_init__(self) -> None:
        if self.async_mode not in ASYNC_MODES:
            raise ValueError(
                f"checkpoint.async_mode must be one of {ASYNC_MODES}, got {self.async_mode!r}"
            )
        if self.interval <= 0:
            raise ValueError(f"checkpoint.interval must be positive, got {self.interval}")
        if self.keep_latest_k < 0:
            raise ValueError(f"checkpoint.keep_latest_k must be >= 0, got {self.keep_latest_k}")
