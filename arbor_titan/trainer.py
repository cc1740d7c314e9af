"""The training loop: builds the run in a fixed order, then steps until `training.steps`.

Everything optional (validation, checkpoints, growth, context schedules) arrives as a
`Callback`; the step itself is forward, backward, clip, optimizer step.
"""

import contextlib
import gc
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.distributed.tensor.parallel import loss_parallel

from arbor_titan.callbacks import Callback
from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import to_toml
from arbor_titan.data import build_dataloader, prepare_data
from arbor_titan.distributed.build import build_model
from arbor_titan.distributed.context_parallel import (
    ContextParallel,
    check_attention_runs_here,
)
from arbor_titan.distributed.device import apply_tf32, host_to_device
from arbor_titan.distributed.init import ProcessInfo, barrier, init_distributed
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.distributed.parallelize import DTYPES
from arbor_titan.distributed.pipeline import V_SCHEDULES
from arbor_titan.distributed.reductions import (
    clip_grad_norm_,
    data_parallel_sum,
    mean_over_data_parallel,
    replicated_value,
)
from arbor_titan.health import NonFiniteGuard, OomFallback
from arbor_titan.metrics import MetricLogger, flops_per_token, mfu, peak_flops
from arbor_titan.metrics.memory import MemoryWatch, device_capacity_gib
from arbor_titan.metrics.window import ThroughputWindow
from arbor_titan.models.arbor import ArborArgs, resolve_args
from arbor_titan.models.arbor.loss import counted_labels, cross_entropy_loss
from arbor_titan.models.arbor.masking import model_inputs
from arbor_titan.optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger("arbor_titan")


@dataclass
class TrainState:
    """Progress counters that a checkpoint must carry."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


class Trainer:
    """Owns one run: its process group, data, model (parts), optimizer, metrics and hooks."""

    def __init__(self, cfg: JobConfig, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.proc: ProcessInfo = init_distributed()
        logger.info("TF32: %s", apply_tf32(cfg.training.enable_tf32, self.proc.device))
        self.dims = ParallelDims.from_config(cfg.parallelism, self.proc.world_size)
        self.context_parallel = ContextParallel.from_dims(self.dims)  # shards the batches
        check_attention_runs_here(
            cfg.parallelism.context_parallel_attention, self.proc.device, cfg.data.document_mask
        )
        if self.context_parallel is not None:
            self.context_parallel.check_seq_len(cfg.training.seq_len)
            if cfg.validation.enable and cfg.validation.seq_len:
                self.context_parallel.check_seq_len(cfg.validation.seq_len, "validation.seq_len")
        schedule = cfg.parallelism.pipeline_parallel_schedule
        if self.dims.pp > 1 and schedule in V_SCHEDULES and cfg.validation.enable:
            # torch.distributed.pipelining's eval() fails for V-shaped schedules (torch 2.13).
            raise ValueError(
                f"validation under parallelism.pipeline_parallel_schedule={schedule} is not "
                "supported; set --validation.enable=false or use Interleaved1F1B"
            )
        self.run_dir = Path(cfg.job.dump_folder) / cfg.job.name
        self.state = TrainState()
        self.callbacks = list(callbacks or [])
        # Extra `Stateful` objects that plugins add to every checkpoint (growth, context, ...).
        self.checkpoint_extras: dict[str, object] = {}
        self.stop_requested = False
        self.checkpointer: Callback | None = None  # the CheckpointManager, when enabled
        if self.proc.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
        torch.manual_seed(cfg.training.seed)
        self.loss_fn = (
            torch.compile(cross_entropy_loss)
            if cfg.compile.compiles("loss")
            else cross_entropy_loss
        )

        self._build_data()
        self._build_model()
        self._build_optimizer()
        self._build_metrics()

    # -- building, in order: data (the tokenizer fixes the vocabulary), model, optimizer, metrics

    def _build_data(self) -> None:
        cfg = self.cfg
        cache_dir = Path(cfg.job.dump_folder) / "cache"
        # Rank 0 trains the tokenizer and fills the token cache; the others then only load.
        if self.proc.is_main:
            prepare_data(cfg.data, cfg.tokenizer, cache_dir, show_progress=True, log=logger.info)
        barrier()
        self.data = prepare_data(cfg.data, cfg.tokenizer, cache_dir, False, log=logger.debug)
        self.tokenizer = self.data.tokenizer
        dp_rank, dp_world = self.dims.dp_rank(), self.dims.dp
        seq_len, batch = cfg.training.seq_len, cfg.training.local_batch_size
        # The shape steps run at; a context schedule changes it through `set_context`.
        self.seq_len, self.local_batch_size = seq_len, batch
        self.train_loader = build_dataloader(
            self.data,
            "train",
            seq_len,
            batch,
            dp_rank,
            dp_world,
            cfg.training.seed,
            cfg.data.num_workers,
        )
        self.val_loader = None
        if cfg.validation.enable:
            self.val_loader = build_dataloader(
                self.data, "val", seq_len, batch, dp_rank, dp_world, cfg.training.seed
            )

    def _build_model(self, args: ArborArgs | None = None) -> None:
        cfg, dims = self.cfg, self.dims
        flavor_args = resolve_args(cfg.model, self.tokenizer.vocab_size, cfg.training.seq_len)
        if args is None:
            args = flavor_args
            for callback in self.callbacks:
                args = callback.on_model_args(self, args)
        built = build_model(cfg, dims, args, self.loss_fn, self.proc.device)
        self.model_args, self.model, self.pipeline = built.args, built.model, built.pipeline
        self.num_params, self.num_embedding_params = built.num_params, built.num_embedding_params
        logger.info(
            "model %s/%s%s: %s parameters (%d layers, dim %d, %d heads, %d kv heads, vocab %d); "
            "layout dp_replicate %d × dp_shard %d × cp %d × tp %d × pp %d",
            cfg.model.name,
            cfg.model.flavor,
            "" if self._same_shape(args, flavor_args) else " grown",
            f"{self.num_params:,}",
            args.n_layers,
            args.dim,
            args.n_heads,
            args.n_kv_heads,
            args.vocab_size,
            dims.dp_replicate,
            dims.dp_shard,
            dims.cp,
            dims.tp,
            dims.pp,
        )
        self.compute_dtype = DTYPES[cfg.training.mixed_precision_param]

    @staticmethod
    def _same_shape(args: ArborArgs, flavor_args: ArborArgs) -> bool:
        """Whether `args` has the flavor's weights: context settings (the RoPE table's length
        and scaling) aside."""
        context = {"max_seq_len": 0, "rope_scaling": None}
        return replace(args, **context) == replace(flavor_args, **context)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)

    def rebuild_model(self, args: ArborArgs) -> None:
        """Replace the model (e.g. grown) on the same mesh, with a fresh optimizer whose learning
        rate schedule continues where it was; the caller loads weights and optimizer state. The
        RoPE table keeps its length and scaling: growth changes weights, not the context."""
        args = replace(
            args, max_seq_len=self.model_args.max_seq_len, rope_scaling=self.model_args.rope_scaling
        )
        schedule_state = self.lr_scheduler.state_dict()
        del self.model, self.pipeline, self.optimizer, self.lr_scheduler
        gc.collect()  # the old parts' reference cycles (FSDP, hooks) would keep their memory
        if self.cfg.compile.enable:
            torch._dynamo.reset()  # graphs were specialized to the old shapes
        self._build_model(args)
        self._build_optimizer()
        self.lr_scheduler.load_state_dict(schedule_state)
        self.flops_per_token = self._flops_per_token()

    def _build_metrics(self) -> None:
        cfg = self.cfg
        self.metrics = MetricLogger(cfg.metrics, self.run_dir, enabled=self.proc.is_main)
        self.metrics.log_text("config", to_toml(cfg))
        self.nonfinite_guard = NonFiniteGuard(cfg.training.nonfinite_skip_limit, self.metrics)
        self.oom_fallback = OomFallback(self.metrics) if cfg.training.oom_fallback else None
        capacity = cfg.training.memory_budget_gib or device_capacity_gib(self.proc.device)
        self.memory_watch = MemoryWatch(self.proc.device, capacity, self.metrics)
        self.flops_per_token = self._flops_per_token()
        self.peak = peak_flops(self.proc.device, self.compute_dtype)
        logger.info(
            "MFU peak: %.1f TFLOP/s per device (%s)", self.peak.flops / 1e12, self.peak.source
        )

    def _flops_per_token(self) -> int:
        args = self.model_args
        return flops_per_token(
            self.num_params,
            self.num_embedding_params,
            args.n_layers,
            args.n_heads,
            args.head_dim,
            self.seq_len,
        )

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over every data-parallel rank, at the current shape."""
        accum = self.cfg.training.gradient_accumulation_steps
        return self.local_batch_size * self.seq_len * accum * self.dims.dp

    def set_context(self, seq_len: int, local_batch_size: int, rope: dict | None) -> None:
        """Run the next steps at this shape: the loader re-packs from its position, tokens per
        step and FLOPs per token (the attention term) follow the length, and a new RoPE scaling
        reaches every local model part (each computes RoPE from its args). Pipeline stages
        rebuild for the new batch shape by themselves (`Pipeline.step`)."""
        self.train_loader.set_shape(seq_len, local_batch_size)
        self.seq_len, self.local_batch_size = seq_len, local_batch_size
        self.flops_per_token = self._flops_per_token()
        if rope != self.model_args.rope_scaling:
            self.model_args = replace(self.model_args, rope_scaling=rope)
            parts = [self.model] + (self.pipeline.parts if self.pipeline is not None else [])
            for part in parts:
                # A pipeline stage is a shallow copy of the model with its own args reference.
                part.args = self.model_args

    # -- the step

    def forward_context(self) -> contextlib.ExitStack:
        """Autocast where FSDP2 doesn't already cast parameters; loss parallel under TP."""
        stack = contextlib.ExitStack()
        if self.compute_dtype != torch.float32 and not self.dims.fsdp_enabled:
            stack.enter_context(torch.autocast(self.proc.device.type, dtype=self.compute_dtype))
        if self.dims.tp > 1 and self.cfg.parallelism.enable_loss_parallel:
            stack.enter_context(loss_parallel())
        return stack

    def model_batch(
        self, inputs_bs: torch.Tensor, labels_bs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Tokens, labels and extra model inputs (document ids, positions) as this rank feeds
        them to the model: its context-parallel share of each sequence under cp."""
        extra = model_inputs(inputs_bs, self.cfg.data, self.tokenizer.bos_id)
        if self.context_parallel is None:
            return inputs_bs, labels_bs, extra
        return self.context_parallel.shard_batch(inputs_bs, labels_bs, extra)

    def model_loss(
        self, inputs_bs: torch.Tensor, labels_bs: torch.Tensor, extra: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The mean loss of a batch on a model without pipeline stages: in the model's forward,
        chunk by chunk, under `training.loss_chunk_len` (see models/arbor/loss.py)."""
        if self.cfg.training.loss_chunk_len:
            return self.model(inputs_bs, labels_bs=labels_bs, **extra)
        return self.loss_fn(self.model(inputs_bs, **extra), labels_bs)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches: (loss, grad norm)
        as tensors local to this rank."""
        accum = self.cfg.training.gradient_accumulation_steps
        total_loss = torch.zeros((), device=self.proc.device)
        batches = [
            self.model_batch(*(host_to_device(t, self.proc.device) for t in next(self.train_iter)))
            for _ in range(accum)
        ]
        # The step's loss is the mean over every label that counts in all its micro-batches on
        # every data-parallel rank (answer tokens only, for chat data), as in one large batch.
        step_labels = data_parallel_sum(
            sum(counted_labels(labels) for _, labels, _ in batches), self.dims
        ).clamp(min=1)
        for inputs, labels, extra in batches:
            with self.forward_context():
                if self.pipeline is not None:
                    loss = self.pipeline.step(inputs, labels)
                else:
                    # FSDP averages gradients over the dp x cp ranks: scale them back to a sum.
                    share = counted_labels(labels) * (self.dims.dp * self.dims.cp) / step_labels
                    loss = self.model_loss(inputs, labels, extra) * share
                    loss.backward()
            total_loss += replicated_value(loss.detach())
        pp_group = self.dims.mesh["pp"].get_group() if self.dims.pp > 1 else None
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm, pp_group)
        if self.nonfinite_guard.allows_update(self.state.step + 1, total_loss, grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return total_loss, grad_norm

    def validation_loss(self) -> float:
        """At `validation.seq_len`, or the current training length when that is 0."""
        cfg = self.cfg.validation
        seq_len = cfg.seq_len or self.seq_len
        return self.evaluate(self.val_loader.val_batches(cfg.steps, seq_len=seq_len))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean loss over `batches` (no gradients), reduced over the data-parallel ranks."""
        self.model.eval()
        losses = []
        for inputs, labels in batches:
            inputs, labels = (host_to_device(t, self.proc.device) for t in (inputs, labels))
            inputs, labels, extra = self.model_batch(inputs, labels)
            with self.forward_context():
                if self.pipeline is not None:
                    losses.append(self.pipeline.step(inputs, labels, train=False))
                else:
                    losses.append(replicated_value(self.model_loss(inputs, labels, extra)))
        self.model.train()
        return self.reduce_loss(torch.stack(losses).mean())

    def reduce_loss(self, loss: torch.Tensor) -> float:
        return mean_over_data_parallel(loss, self.dims).item()

    def train(self) -> None:
        cfg = self.cfg.training
        self.train_iter = iter(self.train_loader)
        self.model.train()
        for callback in self.callbacks:
            callback.on_train_start(self)
        # The step's shape (tokens per step) is logged by the context schedule's first event.
        logger.info("training to step %d, from step %d", cfg.steps, self.state.step)
        window = ThroughputWindow(self.proc.device)
        try:
            while self.state.step < cfg.steps and not self.stop_requested:
                for callback in self.callbacks:
                    callback.on_step_start(self)
                tokens_per_step = self.tokens_per_step
                lr = self.lr_scheduler.get_last_lr()[0]
                window.start()
                if self.oom_fallback is None:
                    loss, grad_norm = self.train_step()
                else:
                    loss, grad_norm = self.oom_fallback.step(self)
                self.last_loss = loss
                self.state.step += 1
                self.state.tokens_seen += tokens_per_step
                log_now = self._should_log()
                window.stop(tokens_per_step, self.flops_per_token, synchronize_device=log_now)
                if log_now:
                    self.metrics.log_step(
                        self.state.step,
                        {
                            "loss": self.reduce_loss(loss),
                            "lr": lr,
                            "grad_norm": grad_norm.item(),
                            "tokens_per_second": window.tokens_per_second,
                            "mfu": mfu(
                                window.tokens_per_second / self.proc.world_size,
                                window.flops_per_token,
                                self.peak,
                            ),
                            **self.memory_watch.read(self.state.step),
                            **self.source_tokens(),
                        },
                    )
                    window.reset()
                for callback in self.callbacks:
                    callback.on_step_end(self)
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self)
            self.metrics.close()

    def source_tokens(self) -> dict[str, int]:
        """With [[data.sources]]: the training tokens read from each source so far."""
        if not self.data.mixture:
            return {}
        return {f"tokens_seen/{name}": n for name, n in self.train_loader.token_counts().items()}

    def source_validation_losses(self) -> dict[str, float]:
        """With [[data.sources]]: each source's own held-out loss, as in `validation_loss`."""
        cfg = self.cfg.validation
        seq_len = cfg.seq_len or self.seq_len
        return {
            f"val_loss/{name}": self.evaluate(
                self.val_loader.val_batches(cfg.steps, seq_len=seq_len, source=name)
            )
            for name in self.data.mixture
        }

    def request_stop(self) -> None:
        """End training after the current step's callbacks (e.g. on SIGTERM)."""
        self.stop_requested = True

    def _should_log(self) -> bool:
        step = self.state.step
        return step == 1 or step % self.cfg.metrics.log_freq == 0 or step == self.cfg.training.steps


class Validation(Callback):
    """Held-out loss every `validation.freq` steps and at the last step."""

    def on_step_end(self, trainer: Trainer) -> None:
        step, cfg = trainer.state.step, trainer.cfg
        if step % cfg.validation.freq == 0 or step == cfg.training.steps:
            losses = {"val_loss": trainer.validation_loss(), **trainer.source_validation_losses()}
            trainer.metrics.log_step(step, losses)
