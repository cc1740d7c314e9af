"""The training loop: builds the run in a fixed order, then steps until `training.steps`.

Everything optional (validation, checkpoints, growth, context schedules) arrives as a
`Callback`; the step itself is forward, backward, clip, optimizer step.
"""

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

from arbor_titan.callbacks import Callback
from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import to_toml
from arbor_titan.data import build_dataloader, prepare_data
from arbor_titan.distributed.build import build_model
from arbor_titan.distributed.init import ProcessInfo, barrier, init_distributed
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.distributed.parallelize import DTYPES
from arbor_titan.distributed.pipeline import V_SCHEDULES
from arbor_titan.distributed.reductions import (
    clip_grad_norm_,
    mean_over_data_parallel,
    replicated_value,
)
from arbor_titan.metrics import MetricLogger, flops_per_token, memory_gib, mfu, peak_flops
from arbor_titan.models.arbor import ArborArgs, resolve_args
from arbor_titan.models.arbor.masking import model_inputs
from arbor_titan.models.arbor.model import rope_table
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


def cross_entropy_loss(logits_bsv: torch.Tensor, labels_bs: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, computed in float32 whatever the compute dtype."""
    return F.cross_entropy(logits_bsv.flatten(0, 1).float(), labels_bs.flatten(0, 1))


class Trainer:
    """Owns one run: its process group, data, model (parts), optimizer, metrics and hooks."""

    def __init__(self, cfg: JobConfig, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.proc: ProcessInfo = init_distributed()
        self.dims = ParallelDims.from_config(cfg.parallelism, self.proc.world_size)
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
            "layout dp_replicate %d × dp_shard %d × tp %d × pp %d",
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
        recomputes the table of every local model part. Pipeline stages rebuild for the new
        batch shape by themselves (`Pipeline.step`)."""
        self.train_loader.set_shape(seq_len, local_batch_size)
        self.seq_len, self.local_batch_size = seq_len, local_batch_size
        self.flops_per_token = self._flops_per_token()
        if rope != self.model_args.rope_scaling:
            self.model_args = replace(self.model_args, rope_scaling=rope)
            parts = [self.model] + (self.pipeline.parts if self.pipeline is not None else [])
            for part in parts:
                # A pipeline stage is a shallow copy of the model: it shares the buffer dict,
                # but holds its own reference to the args.
                part.args = self.model_args
                part.rope_cache = rope_table(self.model_args).to(part.rope_cache.device)

    # -- the step

    def forward_context(self) -> contextlib.ExitStack:
        """Autocast where FSDP2 doesn't already cast parameters; loss parallel under TP."""
        stack = contextlib.ExitStack()
        if self.compute_dtype != torch.float32 and not self.dims.fsdp_enabled:
            stack.enter_context(torch.autocast(self.proc.device.type, dtype=self.compute_dtype))
        if self.dims.tp > 1 and self.cfg.parallelism.enable_loss_parallel:
            stack.enter_context(loss_parallel())
        return stack

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches: (loss, grad norm)
        as tensors local to this rank."""
        accum = self.cfg.training.gradient_accumulation_steps
        total_loss = torch.zeros((), device=self.proc.device)
        for _ in range(accum):
            inputs, labels = (t.to(self.proc.device) for t in next(self.train_iter))
            with self.forward_context():
                if self.pipeline is not None:
                    loss = self.pipeline.step(inputs, labels)
                else:
                    extra = model_inputs(inputs, self.cfg.data, self.tokenizer.bos_id)
                    loss = self.loss_fn(self.model(inputs, **extra), labels) / accum
                    loss.backward()
            total_loss += replicated_value(loss.detach())
        pp_group = self.dims.mesh["pp"].get_group() if self.dims.pp > 1 else None
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm, pp_group)
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
            inputs, labels = inputs.to(self.proc.device), labels.to(self.proc.device)
            with self.forward_context():
                if self.pipeline is not None:
                    losses.append(self.pipeline.step(inputs, labels, train=False))
                else:
                    extra = model_inputs(inputs, self.cfg.data, self.tokenizer.bos_id)
                    logits = self.model(inputs, **extra)
                    losses.append(replicated_value(self.loss_fn(logits, labels)))
        self.model.train()
        return self.reduce_loss(torch.stack(losses).mean())

    def reduce_loss(self, loss: torch.Tensor) -> float:
        return mean_over_data_parallel(loss, self.dims.dp, self.dims.tp).item()

    def train(self) -> None:
        cfg = self.cfg.training
        self.train_iter = iter(self.train_loader)
        self.model.train()
        for callback in self.callbacks:
            callback.on_train_start(self)
        # The step's shape (tokens per step) is logged by the context schedule's first event.
        logger.info("training to step %d, from step %d", cfg.steps, self.state.step)
        # Throughput counts only the time inside train_step, so validation and checkpoint
        # callbacks don't dilute tokens/s; a window's tokens add up steps of any length.
        window_seconds, window_tokens, window_flops = 0.0, 0, 0
        try:
            while self.state.step < cfg.steps and not self.stop_requested:
                for callback in self.callbacks:
                    callback.on_step_start(self)
                tokens_per_step = self.tokens_per_step
                lr = self.lr_scheduler.get_last_lr()[0]
                step_start = time.perf_counter()
                loss, grad_norm = self.train_step()
                self.last_loss = loss
                window_seconds += time.perf_counter() - step_start
                window_tokens += tokens_per_step
                window_flops += tokens_per_step * self.flops_per_token
                self.state.step += 1
                self.state.tokens_seen += tokens_per_step
                if self._should_log():
                    tokens_per_second = window_tokens / window_seconds
                    self.metrics.log_step(
                        self.state.step,
                        {
                            "loss": self.reduce_loss(loss),
                            "lr": lr,
                            "grad_norm": grad_norm.item(),
                            "tokens_per_second": tokens_per_second,
                            "mfu": mfu(
                                tokens_per_second / self.proc.world_size,
                                window_flops / window_tokens,  # the window's mean per token
                                self.peak,
                            ),
                            "memory_gib": memory_gib(self.proc.device),
                        },
                    )
                    window_seconds, window_tokens, window_flops = 0.0, 0, 0
                for callback in self.callbacks:
                    callback.on_step_end(self)
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self)
            self.metrics.close()

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
            trainer.metrics.log_step(step, {"val_loss": trainer.validation_loss()})
