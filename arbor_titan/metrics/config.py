"""The `[metrics]` section."""

from dataclasses import dataclass

from arbor_titan.config.fields import option


@dataclass
class MetricsConfig:
    """The `[metrics]` section: how often and where training metrics are written."""

    log_freq: int = option(10, "Log training metrics every this many steps.", ge=1)
    enable_tensorboard: bool = option(True, "Write TensorBoard events to <run dir>/tb/.")
    enable_jsonl: bool = option(
        True, "Append one JSON object per log line to <run dir>/metrics.jsonl."
    )
