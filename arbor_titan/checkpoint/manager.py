"""Saving and resuming a run: a `Callback` that owns the checkpoint folder of one job.

With `checkpoint.enable = false` it is registered only to load `initial_load_path`: it then
neither saves nor looks at the job's own checkpoint folder.
"""

import logging
import shutil
import signal
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from arbor_titan.callbacks import Callback
from arbor_titan.checkpoint.config import CheckpointConfig
from arbor_titan.checkpoint.folders import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    complete_checkpoints,
    find_damage,
    prune,
    publish,
    read_model_args,
    remove_stale_temp_folders,
    step_folder,
    temp_folder,
    write_model_args,
)
from arbor_titan.checkpoint.stateful import ModelState, OptimizerState, RNGState
from arbor_titan.config.loader import to_toml
from arbor_titan.distributed.init import barrier
from arbor_titan.models.arbor.args import ArborArgs

if TYPE_CHECKING:
    from arbor_titan.trainer import Trainer

logger = logging.getLogger("arbor_titan")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def _broadcast(value: object) -> object:
    """Rank 0's value on every rank, so all ranks load and save the same folders."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class CheckpointManager(Callback):
    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self._pending: tuple[Future, Path, Path, int] | None = None
        # Background saves run their collectives on a gloo group of their own, so they never
        # interleave with the training step's collectives on the default group.
        self._async_group = (
            dist.new_group(backend="gloo")
            if dist.is_initialized() and cfg.enable and cfg.async_mode == "async"
            else None
        )
        self._stop_signal = False
        self.root: Path | None = None
        self.last_saved_step: int | None = None
        self.loaded_from: Path | None = None

    # -- hooks

    def on_model_args(self, trainer: "Trainer", args: ArborArgs) -> ArborArgs:
        """The shape of the checkpoint to resume from, or else of `initial_load_path` (a grown
        model), at this run's length."""
        folder = self._resume_folder(trainer)
        if folder is None and self.cfg.initial_load_path:
            folder = Path(self.cfg.initial_load_path)
            try:
                saved = read_model_args(folder)
            except (FileNotFoundError, ValueError) as err:
                raise CheckpointError(f"checkpoint.initial_load_path: {err}") from None
            if saved.vocab_size != args.vocab_size:
                raise CheckpointError(
                    f"checkpoint.initial_load_path: {folder} holds a model of vocabulary "
                    f"{saved.vocab_size}, this run's tokenizer has {args.vocab_size}: set "
                    f"tokenizer.path = {str(folder / TOKENIZER_FILE)!r} (the model's own)"
                )
        if folder is None:
            return args
        saved = replace(read_model_args(folder), max_seq_len=args.max_seq_len)
        if saved != args:
            logger.info("building the model with the shape saved in %s: %s", folder, saved)
        return saved

    def on_train_start(self, trainer: "Trainer") -> None:
        folder = self._resume_folder(trainer)
        if folder is not None:
            self._load(trainer, folder)
        elif self.cfg.initial_load_path:
            self._load_initial_weights(trainer, Path(self.cfg.initial_load_path))
        if self.cfg.enable:
            trainer.checkpointer = self
            signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.cfg.create_seed_checkpoint:
            if trainer.state.step > 0:
                raise CheckpointError(
                    "checkpoint.create_seed_checkpoint needs a job with no checkpoint yet: "
                    f"{self.root} resumes at step {trainer.state.step} (use another --job.name)"
                )
            self.save(trainer)
            self.wait()
            trainer.request_stop()

    def on_step_end(self, trainer: "Trainer") -> None:
        if not self.cfg.enable:
            return
        step, last = trainer.state.step, trainer.cfg.training.steps
        stop = _any_rank(self._stop_signal)
        if step % self.cfg.interval == 0 or step == last or stop:
            weights_only = self.cfg.model_weights_only and step == last
            self.save(trainer, weights_only=weights_only)
        if stop:
            logger.warning("SIGTERM: saved step %d, stopping", step)
            trainer.request_stop()

    def on_train_end(self, trainer: "Trainer") -> None:
        self.wait()

    # -- saving

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._stop_signal = True

    def save(self, trainer: "Trainer", weights_only: bool = False) -> None:
        self.wait()
        step = trainer.state.step
        self.last_saved_step = step
        temp, final = temp_folder(self.root, step), step_folder(self.root, step)
        states = self._states(trainer)
        if weights_only:
            states = {"model": states["model"]}
        if self.cfg.async_mode == "async":
            future = dcp.async_save(
                states, checkpoint_id=str(temp), process_group=self._async_group
            )
            self._pending = (future, temp, final, step)
            logger.info("checkpoint step %d: writing in the background to %s", step, final)
        else:
            dcp.save(states, checkpoint_id=str(temp))
            self._publish(temp, final, step)

    def wait(self) -> None:
        """Finish the background save, if any, and publish it (on every rank together)."""
        if self._pending is None:
            return
        future, temp, final, step = self._pending
        self._pending = None
        future.result()
        self._publish(temp, final, step)

    def _publish(self, temp: Path, final: Path, step: int) -> None:
        barrier()  # every rank's shards are on disk
        if self._is_main():
            # Beside the weights, what a reader needs without the run folder: the resolved
            # config, the model's shape (grown models differ from their flavor) and the
            # tokenizer the run trained.
            (temp / CONFIG_FILE).write_text(self._config_text)
            write_model_args(self._model_args, temp)
            shutil.copyfile(self._tokenizer_path, temp / TOKENIZER_FILE)
            publish(temp, final)
            for old in prune(self.root, self.cfg.keep_latest_k):
                logger.info(
                    "deleted old checkpoint %s (keep_latest_k=%d)", old, self.cfg.keep_latest_k
                )
            logger.info("checkpoint step %d: saved %s", step, final)
        barrier()

    def _is_main(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def _states(self, trainer: "Trainer") -> dict:
        # Keys holding per-rank state carry the rank, so DCP keeps every rank's copy.
        states = {
            "model": ModelState(trainer.model),
            "optimizer": OptimizerState(trainer.model, trainer.optimizer),
            "lr_scheduler": trainer.lr_scheduler,
            "train_state": trainer.state,
            f"dataloader_dp_rank_{trainer.dims.dp_rank()}": trainer.train_loader,
            f"rng_rank_{trainer.proc.rank}": RNGState(),
        }
        states.update(trainer.checkpoint_extras)
        # Remembered for _publish, which may run after the trainer moved on (async saves).
        self._config_text = to_toml(trainer.cfg)
        self._model_args = trainer.model_args
        self._tokenizer_path = trainer.tokenizer.path
        return states

    # -- resuming

    def _resume_folder(self, trainer: "Trainer") -> Path | None:
        """The checkpoint this run resumes from, chosen once by rank 0 for every rank."""
        if not self.cfg.enable:
            return None
        if self.root is None:
            self.root = trainer.run_dir / self.cfg.folder
            if trainer.proc.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in remove_stale_temp_folders(self.root):
                    logger.warning(
                        "removed incomplete checkpoint %s (a save was interrupted)", stale
                    )
            barrier()
            chosen = _broadcast(self._choose(trainer) if self._is_main() else None)
            self._resume_from = None if chosen is None else Path(chosen)
        return self._resume_from

    def _load_initial_weights(self, trainer: "Trainer", path: Path) -> None:
        damage = find_damage(path) if path.is_dir() else f"{path}: not a checkpoint folder"
        if damage:
            raise CheckpointError(f"checkpoint.initial_load_path: {damage}")
        dcp.load({"model": ModelState(trainer.model)}, checkpoint_id=str(path))
        self.loaded_from = path
        logger.info("initialized model weights from %s", path)

    def _choose(self, trainer: "Trainer") -> str | None:
        """The folder to resume from: load_step's, or the newest one that isn't damaged."""
        found = complete_checkpoints(self.root)
        if self.cfg.load_step >= 0:
            folder = step_folder(self.root, self.cfg.load_step)
            if not folder.is_dir():
                steps = ", ".join(str(s) for s, _ in found) or "none"
                raise CheckpointError(
                    f"checkpoint.load_step={self.cfg.load_step}: no checkpoint {folder} "
                    f"(complete checkpoints: {steps})"
                )
            damage = find_damage(folder)
            if damage:
                raise CheckpointError(f"checkpoint.load_step={self.cfg.load_step}: {damage}")
            return str(folder)
        problems = []
        for step, folder in reversed(found):
            damage = find_damage(folder)
            if damage is None:
                return str(folder)
            logger.warning("checkpoint step %d is unusable: %s; trying an older one", step, damage)
            problems.append(damage)
        if problems:
            raise CheckpointError(
                f"no usable checkpoint in {self.root}: "
                + "; ".join(problems)
                + " (remove them or set --checkpoint.enable=false to train from scratch)"
            )
        return None

    def _load(self, trainer: "Trainer", folder: Path) -> None:
        saved = set(FileSystemReader(folder).read_metadata().state_dict_metadata)

        def in_checkpoint(key: str) -> bool:
            return any(s == key or s.startswith(key + ".") for s in saved)

        if not in_checkpoint("optimizer") or not in_checkpoint("train_state"):
            raise CheckpointError(
                f"{folder} holds model weights only (checkpoint.model_weights_only): it has no "
                "optimizer state or step to resume this run from. Resume from a full checkpoint "
                "with --checkpoint.load_step=N, or start a new run from these weights with "
                f"--checkpoint.initial_load_path={folder} and another --job.name"
            )

        states = self._states(trainer)
        # Per-rank entries exist only when this rank's counterpart saved. Under another layout
        # (a different data-parallel world) every rank reads data rank 0's loader state and
        # resumes at the same global position (TokenLoader.load_state_dict); RNG state starts
        # fresh (nothing in training draws from it between steps).
        loader_key = f"dataloader_dp_rank_{trainer.dims.dp_rank()}"
        if not in_checkpoint(loader_key) and in_checkpoint("dataloader_dp_rank_0"):
            states["dataloader_dp_rank_0"] = states.pop(loader_key)
            loader_key = "dataloader_dp_rank_0"
        if in_checkpoint(loader_key):  # an old loader format: say so before DCP misses a key
            prefix = f"{loader_key}."
            try:
                trainer.train_loader.check_state_keys(
                    key.removeprefix(prefix) for key in saved if key.startswith(prefix)
                )
            except ValueError as error:
                raise CheckpointError(f"{folder}: {error}") from None
        missing = [key for key in states if not in_checkpoint(key)]
        for key in missing:
            states.pop(key)
        dcp.load(states, checkpoint_id=str(folder))
        self.loaded_from = folder
        extra = f" (not in the checkpoint: {', '.join(missing)})" if missing else ""
        logger.info("resumed from %s at step %d%s", folder, trainer.state.step, extra)
