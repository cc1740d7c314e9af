"""Parallelism degrees → one named DeviceMesh, validated against the world and the model."""

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from arbor_titan.config.fields import option

SCHEDULES = (
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
# Schedules that run several stages on each rank; the others run exactly one.
MULTI_STAGE_SCHEDULES = (
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
# Launch hint in layout errors: NVIDIA's HGX/DGX nodes carry 8 GPUs.
GPUS_PER_NODE = 8
# Mesh dimension order, outermost first: pipeline stages talk least, tensor parallel most;
# context parallel (a K/V all-gather per layer) sits between data and tensor parallel.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# How cp ranks attend (distributed/context_parallel.py).
CP_ATTENTIONS = ("all_gather", "torch_ring")


@dataclass
class ParallelismConfig:
    """The `[parallelism]` section."""

    data_parallel_replicate_degree: int = option(
        1, "Replicas of the model (HSDP when > 1 with sharding).", ge=1
    )
    data_parallel_shard_degree: int = option(
        -1, "FSDP2 shards per replica; -1 takes the rest of the world.", ge=-1
    )
    tensor_parallel_degree: int = option(1, "Tensor + sequence parallel ranks per layer.", ge=1)
    context_parallel_degree: int = option(
        1, "Ranks that split each sequence (exact attention; they shard parameters too).", ge=1
    )
    context_parallel_attention: str = option(
        "all_gather",
        "all_gather (exact, every device) or torch_ring (torch's ring attention, CUDA only).",
    )
    pipeline_parallel_degree: int = option(1, "Pipeline ranks.", ge=1)
    pipeline_parallel_schedule: str = option("1F1B", f"One of {', '.join(SCHEDULES)}.")
    pipeline_parallel_microbatches: int = option(
        0, "Micro-batches per step; 0 = one per stage.", ge=0
    )
    pipeline_parallel_stages_per_rank: int = option(
        0, "Stages on each pipeline rank; 0 = 2 for looped/V schedules, else 1.", ge=0
    )
    pipeline_parallel_split_points: list[int] = option(
        [], "First layer index of every stage after the first; empty = even split.", ge=1
    )
    enable_loss_parallel: bool = option(True, "With TP: cross-entropy on vocab-sharded logits.")
    fsdp_reshard_after_forward: str = option(
        "default", "default (no under PP, else yes), always, or never."
    )

    def __post_init__(self) -> None:
        if self.pipeline_parallel_schedule not in SCHEDULES:
            raise ValueError(
                f"parallelism.pipeline_parallel_schedule must be one of {', '.join(SCHEDULES)}, "
                f"got {self.pipeline_parallel_schedule!r}"
            )
        if self.context_parallel_attention not in CP_ATTENTIONS:
            raise ValueError(
                "parallelism.context_parallel_attention must be one of "
                f"{', '.join(CP_ATTENTIONS)}, got {self.context_parallel_attention!r}"
            )
        if self.context_parallel_attention != "all_gather" and self.context_parallel_degree == 1:
            raise ValueError(
                f"parallelism.context_parallel_attention = {self.context_parallel_attention!r} "
                "needs parallelism.context_parallel_degree > 1 (no cp ranks to attend across)"
            )
        if self.fsdp_reshard_after_forward not in ("default", "always", "never"):
            raise ValueError(
                "parallelism.fsdp_reshard_after_forward must be 'default', 'always' or 'never', "
                f"got {self.fsdp_reshard_after_forward!r}"
            )


@dataclass
class ParallelDims:
    """Resolved degrees whose product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    cp: int = 1

    @classmethod
    def from_config(cls, cfg: ParallelismConfig, world_size: int) -> "ParallelDims":
        others = (
            cfg.data_parallel_replicate_degree
            * cfg.context_parallel_degree
            * cfg.tensor_parallel_degree
            * cfg.pipeline_parallel_degree
        )
        dp_shard = cfg.data_parallel_shard_degree
        layout = (
            f"replicate {cfg.data_parallel_replicate_degree} × shard {dp_shard} × "
            f"cp {cfg.context_parallel_degree} × tp {cfg.tensor_parallel_degree} × "
            f"pp {cfg.pipeline_parallel_degree}"
        )
        if dp_shard == -1:
            if world_size % others:
                raise ValueError(
                    f"world size {world_size} is not divisible by replicate × cp × tp × pp = "
                    f"{others} "
                    f"({layout}); launch a multiple of {others} processes (NGPU × NNODES)"
                )
            dp_shard = world_size // others
        elif dp_shard == 0:  # the range (>= -1) is checked by the config loader
            raise ValueError("parallelism.data_parallel_shard_degree must be >= 1 or -1, got 0")
        if others * dp_shard != world_size:
            needed = others * dp_shard
            nodes, rest = divmod(needed, GPUS_PER_NODE)
            launch = (
                f"{nodes} nodes × {GPUS_PER_NODE} GPUs: NNODES={nodes} NGPU={GPUS_PER_NODE}"
                if nodes and not rest
                else f"NGPU={needed}"
            )
            raise ValueError(
                f"parallel degrees multiply to {needed} ({layout}): this config needs {needed} "
                f"ranks ({launch}) but the world size is {world_size}; launch that layout, "
                "change the degrees or set parallelism.data_parallel_shard_degree = -1. Check a "
                "layout first with `DRY_RUN=1 ./run_train.sh <config> [--world-size N]`"
            )
        return cls(
            cfg.data_parallel_replicate_degree,
            dp_shard,
            cfg.tensor_parallel_degree,
            cfg.pipeline_parallel_degree,
            world_size,
            cfg.context_parallel_degree,
        )

    def validate_model(
        self, n_layers: int, n_heads: int, n_kv_heads: int, num_stages: int, tie_embeddings: bool
    ) -> None:
        """Errors for layouts the model can't be cut into, each naming the fix."""
        if n_heads % self.tp:
            # A degree dividing the query heads but not the kv heads replicates wk/wv over tp.
            valid = ", ".join(str(d) for d in range(1, n_heads + 1) if n_heads % d == 0)
            raise ValueError(
                f"parallelism.tensor_parallel_degree={self.tp} must divide the model's "
                f"n_heads={n_heads} (each rank computes whole query heads); valid degrees: "
                f"{valid}. Those dividing n_kv_heads={n_kv_heads} split the kv heads too, the "
                "others replicate them"
            )
        if num_stages > n_layers:
            raise ValueError(
                f"{num_stages} pipeline stages (pipeline_parallel_degree={self.pp} × stages per "
                f"rank) exceed the model's {n_layers} layers; use fewer stages"
            )
        if tie_embeddings and (self.pp > 1 or self.tp > 1):
            raise ValueError(
                "model.tie_embeddings cannot be combined with pipeline or tensor parallelism "
                "(the embedding and the output would live on different ranks or shardings)"
            )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """Context-parallel ranks shard parameters too (TorchTitan's `dp_shard_cp`): they hold
        the same weights and their gradients must be summed, which FSDP2 does."""
        return self.dp_shard > 1 or self.dp_replicate > 1 or self.cp > 1

    @cached_property
    def mesh(self) -> DeviceMesh:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return init_device_mesh(
            device_type,
            (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
            mesh_dim_names=MESH_DIMS,
        )

    @cached_property
    def fsdp_mesh(self) -> DeviceMesh:
        """FSDP2's mesh: shards over dp_shard × cp (TorchTitan's `dp_shard_cp`), replicas (HSDP)
        over dp_replicate."""
        mesh = self.mesh
        if self.cp == 1:
            return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]
        shard_cp = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        # Slicing a flattened dim from the root mesh is deprecated (torch 2.11); only HSDP × CP
        # needs it.
        return mesh["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else shard_cp

    def dp_rank(self) -> int:
        """This rank's data shard: ranks that differ only in tp or pp read the same data."""
        if self.world_size == 1:
            return 0
        mesh = self.mesh
        return (
            mesh["dp_replicate"].get_local_rank() * self.dp_shard
            + mesh["dp_shard"].get_local_rank()
        )
