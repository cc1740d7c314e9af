"""Apply every parallelism to a model part, in one fixed order (TorchTitan's):

    tensor + sequence parallel → context parallel → activation checkpointing → torch.compile
    → FSDP2

TP first so AC, compile and FSDP see the final (DTensor) weights; compile before FSDP so each
compiled block is one FSDP unit; FSDP last so it shards what the others produced.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module

from arbor_titan.distributed.activation_checkpoint import (
    ActivationCheckpointConfig,
    apply_activation_checkpointing,
)
from arbor_titan.distributed.compile import CompileConfig, compile_blocks
from arbor_titan.distributed.context_parallel import ContextParallel
from arbor_titan.distributed.parallel_dims import ParallelDims, ParallelismConfig
from arbor_titan.models.arbor.parallelize import (
    ReplicatedKV,
    block_plan,
    replicates_kv,
    root_plan,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Numerics:
    """Precision and placement choices that parallelize needs from `[training]`."""

    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    cpu_offload: bool = False


def parallelize(
    part: nn.Module,
    dims: ParallelDims,
    parallelism: ParallelismConfig,
    ac: ActivationCheckpointConfig,
    compile_cfg: CompileConfig,
    numerics: Numerics,
) -> None:
    """Parallelize one model part (the whole model, or one pipeline stage) in place."""
    if dims.tp > 1:
        apply_tensor_parallel(part, dims.mesh["tp"], parallelism.enable_loss_parallel)
    cp = ContextParallel.from_dims(dims, parallelism.context_parallel_attention)
    apply_context_parallel(part, cp)
    apply_activation_checkpointing(part.layers, ac)
    if compile_cfg.compiles("model"):
        compile_blocks(part.layers)
    if dims.fsdp_enabled:
        apply_fsdp(part, dims, parallelism, numerics)


def apply_tensor_parallel(part: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Tensor + sequence parallel on the part's root modules and blocks; wk/wv replicated when
    tp does not divide the kv heads (each rank then projects the heads it reads)."""
    present = {
        k: v for k, v in root_plan(loss_parallel).items() if getattr(part, k, None) is not None
    }
    parallelize_module(part, tp_mesh, present)
    args, tp = part.args, tp_mesh.size()
    replicated_kv = None
    if replicates_kv(args.n_kv_heads, tp):
        replicated_kv = ReplicatedKV.for_rank(args, tp, tp_mesh.get_local_rank())
    for block in part.layers.values():
        parallelize_module(block, tp_mesh, block_plan(replicate_kv=replicated_kv is not None))
        block.attention.replicated_kv = replicated_kv
    part.sequence_shards = tp


def apply_context_parallel(part: nn.Module, cp: ContextParallel | None) -> None:
    """Point the part and its attention layers at the cp group (before AC wraps the blocks)."""
    if cp is None:
        return
    part.context_parallel = cp
    for block in part.layers.values():
        block.attention.context_parallel = cp


def reshards_after_forward(parallelism: ParallelismConfig, dims: ParallelDims) -> bool:
    """Whether FSDP2 frees gathered block weights after each forward."""
    return {
        # Under PP every micro-batch would re-gather the weights; keep them gathered instead.
        "default": dims.pp == 1,
        "always": True,
        "never": False,
    }[parallelism.fsdp_reshard_after_forward]


def apply_fsdp(
    part: nn.Module, dims: ParallelDims, parallelism: ParallelismConfig, numerics: Numerics
) -> None:
    """FSDP2 per block and at the part's root; HSDP when the mesh has replicas."""
    mesh = dims.fsdp_mesh
    reshard = reshards_after_forward(parallelism, dims)
    kwargs = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[numerics.param_dtype], reduce_dtype=DTYPES[numerics.reduce_dtype]
        ),
    }
    if numerics.cpu_offload:
        # Pinned memory needs an accelerator; on a CPU-only machine it fails (docs/measured.md).
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    blocks = list(part.layers.values())
    for index, block in enumerate(blocks):
        # The last block's weights are needed again at once by backward: don't reshard them.
        fully_shard(block, reshard_after_forward=reshard and index < len(blocks) - 1, **kwargs)
    fully_shard(part, reshard_after_forward=reshard, **kwargs)
