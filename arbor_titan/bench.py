"""What the benchmark scripts share: a training run launched as a user launches it, its
metrics.jsonl read back as curves, and the point where a curve first reaches a target loss."""

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from arbor_titan.config.cli import load_config

REPO = Path(__file__).resolve().parents[1]


def launch(name: str, config: Path, overrides: list[str]) -> None:
    """Run `python -m arbor_titan.train` afresh (its old run folder removed), echoing its log
    lines behind `[name]`; a failed run ends the benchmark with its exit code."""
    cfg = load_config(config, overrides)
    shutil.rmtree(Path(cfg.job.dump_folder) / cfg.job.name, ignore_errors=True)
    command = [sys.executable, "-m", "arbor_titan.train", str(config), *overrides]
    print(f"[{name}] {shlex.join(command)}", flush=True)
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] training failed with exit code {proc.returncode}")


@dataclass
class RunMetrics:
    """A finished run's metrics.jsonl: step records, losses and events, in file order."""

    steps: list[dict] = field(default_factory=list)  # records with a training "loss"
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss)
    events: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> "RunMetrics":
        run = cls()
        for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "event" in record:
                run.events.append(record)
            elif "val_loss" in record:
                run.val.append((record["step"], record["val_loss"]))
            elif "loss" in record:
                run.steps.append(record)
        return run

    @property
    def train(self) -> list[tuple[int, float]]:
        """(step, training loss)."""
        return [(record["step"], record["loss"]) for record in self.steps]

    def events_of(self, kind: str) -> list[dict]:
        return [event for event in self.events if event["event"] == kind]


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first x at which an (x, loss) curve reaches `target`, linearly interpolated between
    evaluations; None when it never does."""
    for i, (x, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return x
            (x0, l0), (x1, l1) = curve[i - 1], (x, loss)
            return x0 + (x1 - x0) * (l0 - target) / (l0 - l1)
    return None
