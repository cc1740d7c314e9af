"""Pipeline parallelism: cut the model into stages and drive them with a named schedule.

Each rank keeps only the layers of its own stages, under their original names, so checkpoints
load across any stage split. Looped schedules place stages r, r+pp, ... on rank r; V-shaped ones
(ZBVZeroBubble, DualPipeV) place r and 2·pp-1-r, so the first and last stage share a rank.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _PipelineSchedule,
    get_schedule_class,
)

from arbor_titan.distributed.parallel_dims import (
    MULTI_STAGE_SCHEDULES,
    ParallelDims,
    ParallelismConfig,
)

V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


def stages_per_rank(cfg: ParallelismConfig) -> int:
    if cfg.pipeline_parallel_stages_per_rank:
        return cfg.pipeline_parallel_stages_per_rank
    return 2 if cfg.pipeline_parallel_schedule in MULTI_STAGE_SCHEDULES else 1


def num_microbatches(cfg: ParallelismConfig, pp: int) -> int:
    """Micro-batches each pipeline step splits the batch into: configured, else one per stage."""
    return cfg.pipeline_parallel_microbatches or pp * stages_per_rank(cfg)


def layer_split(n_layers: int, num_stages: int, split_points: list[int]) -> list[range]:
    """Layer ranges of each stage: from explicit first-layer indices, or as even as possible."""
    if split_points:
        if len(split_points) != num_stages - 1:
            raise ValueError(
                f"parallelism.pipeline_parallel_split_points needs {num_stages - 1} entries for "
                f"{num_stages} stages, got {len(split_points)}"
            )
        bounds = [0, *split_points, n_layers]
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                "parallelism.pipeline_parallel_split_points must be increasing layer indices "
                f"inside (0, {n_layers}), got {split_points}"
            )
    else:
        base, extra = divmod(n_layers, num_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stage_ids_of_rank(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    if schedule in V_SCHEDULES:
        if per_rank != 2:
            raise ValueError(
                f"parallelism.pipeline_parallel_schedule={schedule} needs 2 stages per rank"
            )
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(per_rank)]


def local_model(
    model: nn.Module, stage_layers: list[range], has_first: bool, has_last: bool
) -> None:
    """Drop, in place, every part of `model` that no local stage holds."""
    keep = {str(i) for layers in stage_layers for i in layers}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if not has_first:
        model.tok_embeddings = None
    if not has_last:
        model.norm = None
        model.output = None


def stage_module(model: nn.Module, layers: range, is_first: bool, is_last: bool) -> nn.Module:
    """A shallow view of `model` running only `layers`; its submodules are shared, not copied."""
    stage = copy.copy(model)
    stage._modules = dict(model._modules)
    stage.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    if not is_first:
        stage.tok_embeddings = None
    if not is_last:
        stage.norm = None
        stage.output = None
    return stage


class Pipeline:
    """The local stages of one pipeline rank and the schedule that runs them."""

    def __init__(
        self,
        model: nn.Module,
        dims: ParallelDims,
        cfg: ParallelismConfig,
        local_batch_size: int,
        grad_accumulation_steps: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
    ):
        per_rank = stages_per_rank(cfg)
        num_stages = dims.pp * per_rank
        splits = layer_split(model.args.n_layers, num_stages, cfg.pipeline_parallel_split_points)
        pp_mesh = dims.mesh["pp"]
        ids = stage_ids_of_rank(
            pp_mesh.get_local_rank(), dims.pp, per_rank, cfg.pipeline_parallel_schedule
        )
        self.has_first, self.has_last = 0 in ids, num_stages - 1 in ids
        local_model(model, [splits[i] for i in ids], self.has_first, self.has_last)
        self.stage_ids = ids
        self.parts = [stage_module(model, splits[i], i == 0, i == num_stages - 1) for i in ids]
        self.microbatches = num_microbatches(cfg, dims.pp)
        if local_batch_size % self.microbatches:
            raise ValueError(
                f"training.local_batch_size={local_batch_size} must be divisible by "
                f"parallelism.pipeline_parallel_microbatches={self.microbatches}"
            )
        self._pp_group, self._device, self._num_stages = pp_mesh.get_group(), device, num_stages
        self._schedule_class = get_schedule_class(cfg.pipeline_parallel_schedule)
        # Each micro-batch loss is pre-scaled so the summed gradients are the batch mean (the
        # schedule's own scale_grads would also rescale gradients accumulated by earlier calls).
        self._accum = grad_accumulation_steps
        scale = 1.0 / (self.microbatches * grad_accumulation_steps)
        self._loss_fn = lambda logits, labels: loss_fn(logits, labels) * scale

    def build_schedule(self) -> None:
        """Create stages and the schedule once the parts are parallelized and materialized,
        and again for each new batch shape (`fit_batch_shape`)."""
        stages = [
            PipelineStage(part, i, self._num_stages, self._device, group=self._pp_group)
            for part, i in zip(self.parts, self.stage_ids)
        ]
        single = issubclass(self._schedule_class, PipelineScheduleSingle)
        if single and len(stages) != 1:
            raise ValueError(
                f"{self._schedule_class.__name__} runs one stage per rank; set "
                "parallelism.pipeline_parallel_stages_per_rank = 1"
            )
        if not single and len(stages) < 2 and self._schedule_class.__name__ in V_SCHEDULES:
            raise ValueError(f"{self._schedule_class.__name__} needs 2 stages per rank")
        self.schedule: _PipelineSchedule = self._schedule_class(
            stages[0] if single else stages,
            n_microbatches=self.microbatches,
            loss_fn=self._loss_fn,
            scale_grads=False,
        )
        self._batch_shape: tuple[int, ...] | None = None

    def fit_batch_shape(self, batch_shape: tuple[int, ...]) -> None:
        """Rebuild the stages when the batch shape changes (a new sequence length or micro-batch
        from a context schedule, validation at another length): a `PipelineStage` infers its
        activation shapes on its first step and keeps its receive buffers for them. Every rank of
        a pipeline sees the same batch shape, so they all rebuild together."""
        if self._batch_shape is not None and batch_shape != self._batch_shape:
            self.build_schedule()
        self._batch_shape = batch_shape

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, train: bool = True) -> torch.Tensor:
        """Run one batch through the pipeline (with backward when `train`).

        Returns this batch's share of the step loss (its mean loss / accumulation steps) when
        training, its mean loss when evaluating; 0 on ranks without the last stage."""
        self.fit_batch_shape(tuple(inputs.shape))
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        args = (inputs,) if self.has_first else ()
        run(
            *args,
            target=labels if self.has_last else None,
            losses=losses if self.has_last else None,
        )
        if not losses:
            return torch.zeros((), device=self._device)
        total = torch.stack([loss.detach() for loss in losses]).sum()
        return total if train else total * self._accum
