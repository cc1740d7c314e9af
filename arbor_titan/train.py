"""Entry point: `python -m arbor_titan.train CONFIG.toml [--section.key=value ...]`.

Launched by ./run_train.sh through torchrun; also runs as a plain single process.
"""

import logging
import os
import sys

from arbor_titan.checkpoint.manager import CheckpointError
from arbor_titan.config.cli import parse_cli
from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import ConfigError, to_toml
from arbor_titan.distributed.init import barrier, shutdown
from arbor_titan.health import HangWatchdog, NonFiniteError, OutOfMemoryStop, log_restart_notice
from arbor_titan.launch import report_user_error
from arbor_titan.metrics.console import setup_console_logging
from arbor_titan.registry import PluginError

logger = logging.getLogger("arbor_titan")


def resolve_auto_activation_checkpoint(cfg: JobConfig) -> JobConfig:
    """Every rank plans the same world and picks the same mode, before any process group."""
    import torch

    from arbor_titan.estimate.auto_ac import choose_for_training
    from arbor_titan.metrics.memory import device_capacity_gib

    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    capacity = cfg.training.memory_budget_gib or device_capacity_gib(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg, reason = choose_for_training(cfg, world_size, capacity, device.type)
    logger.info(reason)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", 0))
    # Only LOG_RANK (default 0) prints progress; warnings and errors come from every rank.
    setup_console_logging(rank, show=rank == int(os.environ.get("LOG_RANK", 0)))
    try:
        cfg, print_only = parse_cli(argv)
        if print_only:
            print(to_toml(cfg))
            return 0
        from arbor_titan.checkpoint.manager import CheckpointManager
        from arbor_titan.context.callback import ContextCallback
        from arbor_titan.float8_callback import float8_callbacks
        from arbor_titan.growth.callback import GrowthCallback
        from arbor_titan.registry import load_plugins
        from arbor_titan.trainer import Trainer, Validation

        load_plugins(cfg.plugins.modules)
        if cfg.activation_checkpoint.mode == "auto":
            cfg = resolve_auto_activation_checkpoint(cfg)
        callbacks = [Validation()] if cfg.validation.enable else []
        callbacks += float8_callbacks(cfg.float8)
        # Before the checkpoint manager, which saves the schedule's state after it has seen the
        # step's loss (see arbor_titan/context/callback.py).
        callbacks.append(ContextCallback(cfg.context, cfg.training))
        if cfg.checkpoint.enable or cfg.checkpoint.initial_load_path:
            callbacks.append(CheckpointManager(cfg.checkpoint))
        if cfg.growth.enable:
            callbacks.append(GrowthCallback(cfg.growth))
        if cfg.training.hang_timeout_s > 0:
            # Last: armed after a resume's checkpoint load, re-armed after each step's saves.
            callbacks.append(HangWatchdog(cfg.training.hang_timeout_s))
        log_restart_notice(cfg.checkpoint.enable)
        trainer = Trainer(cfg, callbacks)
        trainer.train()
        # Every rank reaches teardown together: a rank that closes its connections while another
        # still finishes rank-0-only work (last checkpoint, TensorBoard flush) can make gloo abort
        # that other rank at exit. Only on success: after an error a barrier could wait forever.
        barrier()
    except (
        ConfigError,
        CheckpointError,
        PluginError,
        ValueError,
        FileNotFoundError,
        NonFiniteError,
        OutOfMemoryStop,
    ) as err:
        # User mistakes (config keys, values, paths) and a diverged or out-of-memory run get one
        # clear line, not a traceback; ARBOR_TRACEBACK=1 shows where it came from.
        if os.environ.get("ARBOR_TRACEBACK") == "1":
            raise
        return report_user_error(f"error: {err}")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
