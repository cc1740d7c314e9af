"""`[activation_checkpoint] mode = "auto"`: the cheapest mode whose plan fits the device.

Recomputation costs time (full recomputes every block's forward, about a third more FLOPs), so
the modes are tried from cheapest to most frugal: none, selective, full. Each is planned with
the dry run's memory model for this world, at the run's longest sequences: a `[context]`
schedule's longest stage, which the mode chosen at the start must also fit.
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from arbor_titan.config.cli import load_config
from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import ConfigError, to_toml
from arbor_titan.estimate.memory import MemoryOptions
from arbor_titan.estimate.plan import EstimateOptions, plan, planned_length
from arbor_titan.registry import PluginError

GIB = 2**30
# From the least recomputation to the least memory.
MODES_BY_COST = ("none", "selective", "full")


def with_mode(cfg: JobConfig, mode: str) -> JobConfig:
    return replace(cfg, activation_checkpoint=replace(cfg.activation_checkpoint, mode=mode))


def choose_activation_checkpoint(
    cfg: JobConfig, world_size: int, memory: MemoryOptions
) -> tuple[JobConfig, str]:
    """`cfg` with `mode = "auto"` replaced by the cheapest mode that fits `memory.capacity_gib`
    per process, and why; a ValueError with the planner's figures when none fits."""
    capacity_gib, peaks = memory.capacity_gib, []
    for mode in MODES_BY_COST:
        candidate = with_mode(cfg, mode)
        result = plan(candidate, EstimateOptions(world_size=world_size, memory=memory))
        peak = max(r.memory.total for r in result.ranks) / GIB
        peaks.append(f"{mode} {peak:.3f} GiB")
        if result.fits:
            reason = (
                f"activation_checkpoint.mode = auto chose {mode!r}: the planner's peak "
                f"{peak:.3f} GiB per process fits {capacity_gib:.3f} GiB ({', '.join(peaks)})"
            )
            return candidate, reason
    raise ValueError(
        f"activation_checkpoint.mode = auto: no mode fits {capacity_gib:.3f} GiB per process "
        f"(planned peaks: {', '.join(peaks)}); lower training.local_batch_size or "
        "training.seq_len, set training.loss_chunk_len, or spread the model over more ranks "
        "(parallelism.*_degree); `DRY_RUN=1 ./run_train.sh CONFIG` shows where memory goes"
    )


def choose_for_training(
    cfg: JobConfig, world_size: int, capacity_gib: float, device: str
) -> tuple[JobConfig, str]:
    """`choose_activation_checkpoint` from inside a training process, in a child process, at
    the schedule's longest stage (the mode then applies to `cfg` as it stands).

    The planner must not touch the GPUs (its fake process group would build a CUDA device mesh
    in the training process), so it runs where they are hidden, like `DRY_RUN=1`.
    """
    with tempfile.TemporaryDirectory(prefix="arbor_auto_ac_") as folder:
        config = Path(folder) / "config.toml"
        config.write_text(to_toml(cfg))
        command = [sys.executable, "-m", "arbor_titan.estimate.auto_ac", str(config)]
        command += [str(world_size), str(capacity_gib), device]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # the child is no rank of this job
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["the planner failed"]
        raise ValueError(lines[-1].removeprefix("error: "))
    choice = json.loads(done.stdout.strip().splitlines()[-1])
    return with_mode(cfg, choice["mode"]), choice["reason"]


def main(argv: list[str]) -> int:
    """`python -m arbor_titan.estimate.auto_ac CONFIG WORLD_SIZE CAPACITY_GIB DEVICE`: the
    choice as one JSON line, or `error: ...` and status 2."""
    config, world_size, capacity_gib, device = argv
    try:
        length = planned_length(load_config(config, []))
        memory = MemoryOptions(capacity_gib=float(capacity_gib), device=device)
        chosen, reason = choose_activation_checkpoint(length.config, int(world_size), memory)
        if length.source != "training.seq_len":
            training = length.config.training
            reason += (
                f", planned at {training.seq_len:,} tokens × local_batch_size "
                f"{training.local_batch_size}, {length.source}"
            )
    except (ConfigError, PluginError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"mode": chosen.activation_checkpoint.mode, "reason": reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
