"""Build one rank's share of the model exactly as training would, but on the meta device under a
fake process group of the config's world size, and record what that rank holds.

The build is `build_model(..., materialize=False)`, the same code a real run executes up to
`to_empty`, so layer ranges, shard shapes and schedules are the real ones, not a re-derivation.
A fake process group answers every collective at once without peers; re-initializing it per
rank in one process costs ~0.15 s per rank for the 400B plan (measured; see tests/estimate).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from arbor_titan.config.job import JobConfig
from arbor_titan.distributed.build import build_model
from arbor_titan.distributed.float8 import gathers_in_float8
from arbor_titan.distributed.parallel_dims import MESH_DIMS, ParallelDims
from arbor_titan.distributed.pipeline import layer_split, stages_per_rank
from arbor_titan.models.arbor import ArborArgs, resolve_args


@dataclass(frozen=True)
class WeightShard:
    """One kind of weight (wq, w1, attention_norm, tok_embeddings, ...) as this rank holds it."""

    kind: str
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    placements: str
    dtype: str
    count: int  # how many weights of this kind the rank holds (one per local layer)
    float8: bool  # a torchao Float8Linear


@dataclass
class ShardUnit:
    """The parameters FSDP2 gathers together: one block, or a stage's root (embedding/norm/output).

    `gathered_*` count elements after the FSDP all-gather, still divided by tensor parallel.
    """

    name: str
    local_numel: int = 0
    gathered_numel: int = 0
    gathered_float8_numel: int = 0  # the part FSDP2 all-gathers as float8


@dataclass(frozen=True)
class StageInfo:
    stage_id: int
    layers: range
    has_embedding: bool
    has_head: bool  # final norm + output projection + loss
    block_ac: tuple[str, ...]  # per local block: "none", "full" or "op"


@dataclass
class RankBuild:
    """Everything the memory and report steps need from one simulated rank."""

    rank: int
    coordinate: dict[str, int]
    args: ArborArgs
    num_params: int
    num_embedding_params: int
    stages: list[StageInfo]
    weights: dict[str, WeightShard]
    units: list[ShardUnit]
    local_numel: int = 0
    local_param_bytes: int = 0
    local_param_tensors: int = 0
    stage_numel: int = 0  # unique (global) parameters of this rank's stages
    autocast_numel: int = 0  # local weights autocast casts to the compute dtype (nn.Linear's)
    # The pipeline schedule's actions for this rank, as (type, stage id): F, B, I or W.
    actions: list[tuple[str, int]] = field(default_factory=lambda: [("F", 0), ("B", 0)])
    microbatches: int = 1
    pipelined: bool = False


def sample_ranks(dims: ParallelDims) -> list[int]:
    """The first and last rank and the first rank of every pipeline stage group.

    pp is the outermost mesh dimension, so pipeline rank p owns ranks p·W/pp ... (p+1)·W/pp - 1;
    the last rank also holds the last (possibly smallest) FSDP shard.
    """
    per_stage = dims.world_size // dims.pp
    return sorted({0, dims.world_size - 1, *(p * per_stage for p in range(dims.pp))})


@contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _unused_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the planner builds the pipeline schedule but never runs it")


def simulate_rank(cfg: JobConfig, rank: int, world_size: int, vocab_size: int) -> RankBuild:
    """Build rank `rank`'s model on meta under a fake process group and describe it."""
    with fake_process_group(rank, world_size):
        dims = ParallelDims.from_config(cfg.parallelism, world_size)
        args = resolve_args(cfg.model, vocab_size, cfg.training.seq_len)
        built = build_model(cfg, dims, args, _unused_loss, torch.device("meta"), False)
        coordinate = dict(zip(MESH_DIMS, dims.mesh.get_coordinate()))
        parts = [built.model] if built.pipeline is None else built.pipeline.parts
        stage_ids = [0] if built.pipeline is None else built.pipeline.stage_ids
        num_stages = dims.pp * stages_per_rank(cfg.parallelism) if dims.pp > 1 else 1
        splits = layer_split(
            built.args.n_layers, num_stages, cfg.parallelism.pipeline_parallel_split_points
        )
        stages = [
            StageInfo(
                stage_id,
                splits[stage_id],
                part.tok_embeddings is not None,
                part.norm is not None,
                tuple(_ac_mode(block, cfg) for block in part.layers.values()),
            )
            for part, stage_id in zip(parts, stage_ids)
        ]
        build = RankBuild(
            rank=rank,
            coordinate=coordinate,
            args=built.args,
            num_params=built.num_params,
            num_embedding_params=built.num_embedding_params,
            stages=stages,
            weights=_weight_shards(built.model),
            units=_shard_units(built.model),
        )
        for _, module, _, param in _owners(built.model):
            local = _local(param)
            build.local_numel += local.numel()
            build.local_param_bytes += local.numel() * local.element_size()
            build.local_param_tensors += 1
            build.stage_numel += param.numel()
            if type(module) is nn.Linear:
                build.autocast_numel += local.numel()
        if built.pipeline is not None:
            built.pipeline.build_schedule()
            build.actions = _schedule_actions(built.pipeline.schedule, coordinate["pp"])
            build.microbatches = built.pipeline.microbatches
            build.pipelined = True
        return build


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _ac_mode(block: nn.Module, cfg: JobConfig) -> str:
    if not isinstance(block, CheckpointWrapper):
        return "none"
    ac = cfg.activation_checkpoint
    return "op" if ac.mode == "selective" and ac.selective_ac_option == "op" else "full"


def _owners(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(parameter name, owning module, the module's attribute name, parameter)."""
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            kind = module_name.rsplit(".", 1)[-1]
            yield f"{module_name}.{param_name}", module, kind, param


def _weight_shards(model: nn.Module) -> dict[str, WeightShard]:
    shards: dict[str, WeightShard] = {}
    for _, module, kind, param in _owners(model):
        if kind in shards:
            first = shards[kind]
            shards[kind] = replace(first, count=first.count + 1)
            continue
        placements = (
            ", ".join(str(p) for p in param.placements) if isinstance(param, DTensor) else "-"
        )
        shards[kind] = WeightShard(
            kind=kind,
            global_shape=tuple(param.shape),
            local_shape=tuple(_local(param).shape),
            placements=placements,
            dtype=str(param.dtype).removeprefix("torch."),
            count=1,
            float8=type(module).__name__ == "Float8Linear",
        )
    return shards


def _tp_numel(param: torch.Tensor) -> int:
    """Elements per rank once FSDP has gathered the parameter: only TP still divides it."""
    if not isinstance(param, DTensor):
        return param.numel()
    mesh, numel = param.device_mesh, param.numel()
    for index, (dim_name, placement) in enumerate(zip(mesh.mesh_dim_names, param.placements)):
        if dim_name == "tp" and placement.is_shard():
            numel //= mesh.size(index)
    return numel


def _shard_units(model: nn.Module) -> list[ShardUnit]:
    units: dict[str, ShardUnit] = {}
    for name, module, _, param in _owners(model):
        parts = name.split(".")
        unit_name = ".".join(parts[:2]) if parts[0] == "layers" else "root"
        unit = units.setdefault(unit_name, ShardUnit(unit_name))
        unit.local_numel += _local(param).numel()
        gathered = _tp_numel(param)
        unit.gathered_numel += gathered
        if gathers_in_float8(module):
            unit.gathered_float8_numel += gathered
    return list(units.values())


def _schedule_actions(schedule: object, pp_rank: int) -> list[tuple[str, int]]:
    """This rank's compute actions in schedule order; overlapped pairs become two actions."""
    actions: list[tuple[str, int]] = []
    for action in schedule.pipeline_order[pp_rank]:
        if action is None:
            continue
        for sub in action.sub_actions or (action,):
            kind = sub.computation_type.value
            if kind in ("F", "B", "I", "W"):
                actions.append((kind, sub.stage_index))
    return actions
