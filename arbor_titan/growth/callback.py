"""Live growth in the trainer, under any parallelism.

At a growth step the run writes a checkpoint (the recovery point), the stage's operator grows
that checkpoint tensor by tensor into a new folder (the same code as offline growth), the
trainer rebuilds the model with the new args on the same mesh, and the grown weights and
optimizer state load into it through DCP — which reshards them for FSDP, TP or a new pipeline
split alike. The grown state is then saved as the step's checkpoint, so a resume rebuilds the
grown model.
"""

import logging
import os
import shutil
from typing import TYPE_CHECKING

import torch.distributed.checkpoint as dcp

from arbor_titan.callbacks import Callback
from arbor_titan.checkpoint.folders import step_folder
from arbor_titan.checkpoint.stateful import ModelState, OptimizerState
from arbor_titan.data import build_dataloader
from arbor_titan.distributed.init import barrier
from arbor_titan.growth.build import build_schedule, plan_growth
from arbor_titan.growth.checkpoint import grow_checkpoint
from arbor_titan.growth.config import GrowthConfig
from arbor_titan.growth.rewarmup import Rewarmup
from arbor_titan.models.arbor.args import ArborArgs, resolve_args

if TYPE_CHECKING:
    from arbor_titan.trainer import Trainer

logger = logging.getLogger("arbor_titan")


class GrowthCallback(Callback):
    def __init__(self, cfg: GrowthConfig):
        self.cfg = cfg
        self.schedule = build_schedule(cfg)
        self.rewarmup = Rewarmup(cfg.rewarmup_steps)

    def on_model_args(self, trainer: "Trainer", args: ArborArgs) -> ArborArgs:
        # Registered before the checkpoint is loaded, so a resume restores the stages applied.
        trainer.checkpoint_extras["growth_schedule"] = self.schedule
        if self.cfg.rewarmup_steps:  # only then, so older checkpoints still resume
            trainer.checkpoint_extras["growth_rewarmup"] = self.rewarmup
        return args

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.checkpointer is None:
            raise ValueError(
                "growth.enable needs checkpoint.enable = true: each growth step writes a "
                "recovery checkpoint and grows it"
            )
        cfg = trainer.cfg
        # Every stage is checked against the shapes it will meet before step 0, not at step 2000.
        flavor_args = resolve_args(cfg.model, trainer.tokenizer.vocab_size, cfg.training.seq_len)
        self.plan = plan_growth(self.cfg, flavor_args)
        # One fixed held-out batch measures the loss just before and just after each growth.
        loader = build_dataloader(
            trainer.data,
            "val",
            cfg.training.seq_len,
            cfg.training.local_batch_size,
            trainer.dims.dp_rank(),
            trainer.dims.dp,
            cfg.training.seed,
        )
        self.fixed_batch = list(loader.val_batches(1))
        self.rewarmup.apply(trainer.lr_scheduler)  # a resume inside a ramp keeps ramping

    def on_step_end(self, trainer: "Trainer") -> None:
        step = trainer.state.step
        self.schedule.observe(step, trainer.reduce_loss(trainer.last_loss))
        stage = self.schedule.due(step)
        if stage is not None:
            self.grow(trainer, stage)

    def grow(self, trainer: "Trainer", stage: int) -> None:
        growth, step, checkpointer = self.plan[stage], trainer.state.step, trainer.checkpointer
        loss_before, params_before = trainer.evaluate(self.fixed_batch), trainer.num_params
        if checkpointer.last_saved_step != step:
            checkpointer.save(trainer)
        checkpointer.wait()
        stage_dir = trainer.run_dir / "growth" / f"stage-{stage}-step-{step}"
        before, after = stage_dir / "before", stage_dir / "after"
        if trainer.proc.is_main:
            shutil.rmtree(stage_dir, ignore_errors=True)
            stage_dir.mkdir(parents=True)
            # The pre-growth checkpoint stays as the recovery point of this stage.
            os.replace(step_folder(checkpointer.root, step), before)
            grow_checkpoint(before, after, lambda _: growth, log=logger.debug)
        barrier()
        trainer.rebuild_model(growth.new_args)
        dcp.load(
            {"model": ModelState(trainer.model),
             "optimizer": OptimizerState(trainer.model, trainer.optimizer)},
            checkpoint_id=str(after),
        )  # fmt: skip
        barrier()
        if trainer.proc.is_main:
            shutil.rmtree(after)
        self.schedule.mark_applied()
        self.rewarmup.begin(step, trainer.lr_scheduler)
        loss_after = trainer.evaluate(self.fixed_batch)
        trainer.metrics.log_event(step, "growth", {
            "op": self.cfg.stages[stage].op,
            "params_before": params_before,
            "params_after": trainer.num_params,
            "loss_before": loss_before,
            "loss_after": loss_after,
        })  # fmt: skip
        checkpointer.save(trainer)
