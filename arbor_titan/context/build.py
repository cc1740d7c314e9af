"""From the `[context]` section to a checked `ContextSchedule`: every error names its key
(`context.schedule`, `context.schedule_params.<key>`, `context.rope_scaling`) and, for an
unknown name, the registered ones."""

from arbor_titan import registry
from arbor_titan.config.loader import ConfigError
from arbor_titan.config.params import parse_params
from arbor_titan.context.config import ContextConfig
from arbor_titan.context.schedule import (
    PARAMS_KEY,
    ContextSchedule,
    ContextShape,
    ScheduleParamError,
)
from arbor_titan.models.arbor.rope import check_rope_scaling


def initial_rope(cfg: ContextConfig) -> dict | None:
    """The `[context]` scaling applied from step 0, checked; None for plain RoPE."""
    if cfg.rope_scaling:
        try:
            registry.get("rope_scaling", cfg.rope_scaling)
        except registry.PluginError as err:
            raise ConfigError(f"context.rope_scaling: {err}") from None
    settings = cfg.rope_settings()
    check_rope_scaling(settings, "context.rope_params")
    return settings


def build_context_schedule(
    cfg: ContextConfig, seq_len: int, local_batch_size: int
) -> ContextSchedule:
    """The `context_schedule` named by `context.schedule` around the configured shape
    (`training.seq_len`, `training.local_batch_size`, the `[context]` scaling), its params and
    every shape it can answer checked now rather than at the step that needs them."""
    try:
        cls = registry.get("context_schedule", cfg.schedule)
    except registry.PluginError as err:
        raise ConfigError(f"context.schedule: {err}") from None
    params = parse_params(cls.Params, cfg.schedule_params, PARAMS_KEY, cfg.schedule)
    base = ContextShape(seq_len, local_batch_size, initial_rope(cfg))
    try:
        schedule = cls(base, params, cfg.keep_tokens_per_step)
        shapes = schedule.shapes()
    except ScheduleParamError as err:
        raise ConfigError(f"{PARAMS_KEY}.{err.key}: {cfg.schedule}: {err}") from None
    for shape in shapes:
        if shape.seq_len < 1 or shape.local_batch_size < 1:
            raise ConfigError(
                f"context.schedule: {cfg.schedule} answered a shape without tokens: {shape}"
            )
    return schedule
