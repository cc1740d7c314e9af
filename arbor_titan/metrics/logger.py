"""Training metrics to the console, TensorBoard and a JSONL file, under stable names.

Console lines go to the `arbor_titan` logger on every rank (`setup_console_logging` decides
what is shown); files are written only where `enabled`, so one rank owns the run folder.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from torch.utils.tensorboard import SummaryWriter

from arbor_titan.metrics.config import MetricsConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Field:
    tag: str  # TensorBoard tag: dashboards and comparisons across runs depend on it
    label: str  # console label
    fmt: str  # console format spec
    unit: str = ""


# The one place metric keys get their TensorBoard tags and console formats, in console order.
FIELDS: dict[str, _Field] = {
    "loss": _Field("loss/train", "loss", ".4f"),
    "val_loss": _Field("loss/val", "val_loss", ".4f"),
    "lr": _Field("optim/lr", "lr", ".2e"),
    "grad_norm": _Field("optim/grad_norm", "grad_norm", ".3f"),
    "tokens_per_second": _Field("throughput/tokens_per_second", "tok/s", ",.0f"),
    "mfu": _Field("throughput/mfu", "mfu", ".1%"),
    "memory_gib": _Field("memory/gib", "mem", ".2f", " GiB"),
    "memory_reserved_gib": _Field("memory/reserved_gib", "reserved", ".2f", " GiB"),
    "memory_fraction": _Field("memory/fraction_of_capacity", "of capacity", ".0%"),
    "alloc_retries": _Field("memory/alloc_retries", "alloc retries", ".0f"),
    "ooms": _Field("memory/ooms", "ooms", ".0f"),
}


def _field(key: str) -> _Field:
    return FIELDS.get(key) or _Field(f"misc/{key}", key, ".4g")


def format_step(step: int, metrics: dict[str, float]) -> str:
    """`step   20 | loss 5.1234 | ... | mem 1.23 GiB`: known keys first, then the rest."""
    keys = [k for k in FIELDS if k in metrics] + [k for k in metrics if k not in FIELDS]
    parts = [f"step {step:4d}"]
    for key in keys:
        field = _field(key)
        parts.append(f"{field.label} {format(float(metrics[key]), field.fmt)}{field.unit}")
    return " | ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricLogger:
    """Writes each log call to the console, TensorBoard (`run_dir/tb`) and `run_dir/metrics.jsonl`.

    Both are flushed after every call and the JSONL file is appended to (a resumed run continues
    it), so a crash loses nothing already logged.
    """

    def __init__(self, cfg: MetricsConfig, run_dir: Path, enabled: bool) -> None:
        self._tb: SummaryWriter | None = None
        self._jsonl: TextIO | None = None
        if enabled and cfg.enable_tensorboard:
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        if enabled and cfg.enable_jsonl:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (run_dir / "metrics.jsonl").open("a")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """One training (or validation) step's metrics: `loss, lr, grad_norm, ...`."""
        log.info(format_step(step, metrics))
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(_field(key).tag, float(value), step)
            self._tb.flush()
        self._write_json({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_event(self, step: int, event: str, fields: dict[str, Any]) -> None:
        """Something that happened once (growth, context change, checkpoint), with its details."""
        details = " | ".join(f"{k} {v}" for k, v in fields.items())
        log.info(f"event {event} at step {step}" + (f" | {details}" if details else ""))
        if self._tb is not None:
            for key, value in fields.items():
                if _is_number(value):
                    self._tb.add_scalar(f"events/{event}/{key}", value, step)
            summary = "\n".join(f"- {k}: {v}" for k, v in fields.items()) or "(no fields)"
            self._tb.add_text(f"events/{event}", summary, step)
            self._tb.flush()
        self._write_json({"event": event, "step": step, **fields})

    def log_text(self, tag: str, text: str) -> None:
        """Verbatim text in TensorBoard, e.g. the resolved TOML config.

        A fenced code block, because TensorBoard renders text as markdown and would reflow it.
        """
        if self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", 0)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files; the logger writes nothing after this."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def _write_json(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, default=str) + "\n")
            self._jsonl.flush()
