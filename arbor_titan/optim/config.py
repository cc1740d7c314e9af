"""The `[optimizer]` and `[lr_scheduler]` sections, checked when they are built."""

from dataclasses import dataclass

from arbor_titan.config.fields import option

OPTIMIZERS = ("AdamW",)
IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
DECAY_TYPES = ("linear", "cosine", "wsd")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        known = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{key} must be one of {known}, got {value!r}")


@dataclass
class OptimizerConfig:
    """The `[optimizer]` section."""

    name: str = option("AdamW", "Optimizer; only 'AdamW' for now.")
    lr: float = option(8e-4, "Peak learning rate, reached at the end of warmup.", gt=0)
    weight_decay: float = option(
        0.1, "Decoupled weight decay; never applied to 1-D or embedding params.", ge=0
    )
    betas: list[float] = option([0.9, 0.95], "Adam (beta1, beta2).", ge=0, lt=1)
    eps: float = option(1e-8, "Adam epsilon.", gt=0)
    implementation: str = option(
        "auto",
        "'auto' (fused where torch has it for the params' device, else foreach), "
        "'fused', 'foreach' or 'for-loop'.",
    )

    def __post_init__(self) -> None:
        _check_choice("optimizer.name", self.name, OPTIMIZERS)
        _check_choice("optimizer.implementation", self.implementation, IMPLEMENTATIONS)
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas must be two numbers, got {self.betas}")


@dataclass
class LRSchedulerConfig:
    """The `[lr_scheduler]` section: linear warmup, then decay to `min_lr_factor * lr`."""

    warmup_steps: int = option(100, "Steps of linear warmup from ~0 to optimizer.lr.", ge=0)
    decay_type: str = option("cosine", "Decay after warmup: 'linear', 'cosine' or 'wsd'.")
    decay_ratio: float = option(
        0.2,
        "wsd only: the final fraction of all steps over which the lr decays linearly.",
        ge=0,
        le=1,
    )
    min_lr_factor: float = option(0.1, "Final lr as a fraction of optimizer.lr.", ge=0, le=1)

    def __post_init__(self) -> None:
        _check_choice("lr_scheduler.decay_type", self.decay_type, DECAY_TYPES)
