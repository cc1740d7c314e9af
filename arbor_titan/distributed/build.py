"""The model lifecycle shared by training and the dry-run planner:

    meta model → (pipeline split) → parallelize each part → to_empty → init_weights → check

Stopping before `to_empty` (materialize=False) gives the exact sharded model a real run would
have, on the meta device, which is how large configs are planned on one CPU.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from arbor_titan.config.job import JobConfig
from arbor_titan.distributed.float8 import check_float8_layout, convert_to_float8
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.distributed.parallelize import Numerics, parallelize
from arbor_titan.distributed.pipeline import Pipeline, stages_per_rank
from arbor_titan.models.arbor import ArborArgs, Transformer, count_params
from arbor_titan.models.arbor.loss import ChunkedLoss, check_chunked_loss
from arbor_titan.models.arbor.masking import check_document_mask
from arbor_titan.models.arbor.parallelize import replicates_kv

logger = logging.getLogger("arbor_titan")


@dataclass
class BuiltModel:
    """This rank's share of the model: `model` holds every local parameter under its original
    name (for the optimizer and checkpoints); `pipeline` runs the stages when pp > 1."""

    args: ArborArgs
    model: nn.Module
    pipeline: Pipeline | None
    num_params: int
    num_embedding_params: int


def build_model(
    cfg: JobConfig,
    dims: ParallelDims,
    args: ArborArgs,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    materialize: bool = True,
) -> BuiltModel:
    check_document_mask(cfg.data, dims.pp)
    check_chunked_loss(cfg.training.loss_chunk_len, dims.pp, dims.tp)
    num_stages = dims.pp * stages_per_rank(cfg.parallelism) if dims.pp > 1 else 1
    dims.validate_model(
        args.n_layers, args.n_heads, args.n_kv_heads, num_stages, args.tie_embeddings
    )
    with torch.device("meta"):
        model = Transformer(args)
    num_params = count_params(model)
    num_embedding_params = model.tok_embeddings.weight.numel()
    if cfg.training.loss_chunk_len:
        model.chunked_loss = ChunkedLoss(loss_fn, cfg.training.loss_chunk_len)
    check_float8_layout(cfg.float8, dims.fsdp_enabled)
    float8 = cfg.float8
    if replicates_kv(args.n_kv_heads, dims.tp):
        logger.info(
            "tp %d does not divide the %d kv heads: wk/wv are replicated over tp, each rank "
            "projecting the kv heads its query heads read",
            dims.tp,
            args.n_kv_heads,
        )
        # Those rows are projected outside the modules' forward (models/arbor/parallelize.py),
        # so wk/wv stay in the compute dtype.
        float8 = replace(float8, filter_fqns=[*float8.filter_fqns, "attention.wk", "attention.wv"])
    # float8 linears replace nn.Linear before TP and FSDP2 shard them (TorchTitan's order).
    convert_to_float8(model, float8, device)
    pipeline = None
    parts = [model]
    if dims.pp > 1:
        pipeline = Pipeline(
            model,
            dims,
            cfg.parallelism,
            cfg.training.local_batch_size,
            cfg.training.gradient_accumulation_steps,
            loss_fn,
            device,
        )
        parts = pipeline.parts
    numerics = Numerics(
        cfg.training.mixed_precision_param,
        cfg.training.mixed_precision_reduce,
        cfg.training.cpu_offload,
    )
    for part in parts:
        parallelize(part, dims, cfg.parallelism, cfg.activation_checkpoint, cfg.compile, numerics)
    if materialize:
        model.to_empty(device="cpu" if cfg.training.cpu_offload else device)
        model.init_weights(seed=cfg.training.seed)
        check_initialized(model)
        if pipeline is not None:
            pipeline.build_schedule()
    return BuiltModel(args, model, pipeline, num_params, num_embedding_params)


def check_initialized(model: nn.Module) -> None:
    """Fail fast on a parameter that init_weights missed (to_empty leaves garbage, often NaN)."""
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if not torch.isfinite(local).all():
            raise RuntimeError(f"parameter {name} is not finite after init_weights()")
