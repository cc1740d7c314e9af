"""The `[checkpoint]` section (TorchTitan's key names)."""

from dataclasses import dataclass

from arbor_titan.config.fields import option

ASYNC_MODES = ("disabled", "async")


@dataclass
class CheckpointConfig:
    enable: bool = option(True, "Save checkpoints and resume from the newest one.")
    folder: str = option("checkpoints", "Folder under <dump_folder>/<job.name>/.")
    interval: int = option(100, "Save every this many steps (and always at the last step).", ge=1)
    keep_latest_k: int = option(
        0, "Keep only the newest k complete checkpoints (0 keeps all).", ge=0
    )
    async_mode: str = option("disabled", "disabled, or async: write while training goes on.")
    load_step: int = option(-1, "Step to resume from; -1 = newest complete checkpoint.", ge=-1)
    initial_load_path: str = option(
        "",
        "A DCP folder whose model weights start the run when this job has no checkpoint of its "
        "own yet (also with enable = false).",
    )
    create_seed_checkpoint: bool = option(
        False,
        "Save the freshly initialized run as step-0, written sharded by this run's processes, "
        "and stop without training (a later run of the job resumes from it).",
    )
    model_weights_only: bool = option(
        False, "Save the final checkpoint with model weights only (smaller; cannot resume)."
    )

    def __post_init__(self) -> None:
        if self.async_mode not in ASYNC_MODES:
            raise ValueError(
                f"checkpoint.async_mode must be one of {ASYNC_MODES}, got {self.async_mode!r}"
            )
        if self.create_seed_checkpoint and not self.enable:
            raise ValueError(
                "checkpoint.create_seed_checkpoint = true needs checkpoint.enable = true"
            )
