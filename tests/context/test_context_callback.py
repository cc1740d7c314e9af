"""The context callback without a run: start-up checks of a schedule's shapes against the
layout, the loss a schedule reads, its state in checkpoints, and the RoPE table that pipeline
stages share with the model."""

from dataclasses import replace
from types import SimpleNamespace

import pytest

from arbor_titan import registry
from arbor_titan.config.job import JobConfig, TrainingConfig
from arbor_titan.config.loader import ConfigError
from arbor_titan.context.build import build_context_schedule
from arbor_titan.context.callback import ContextCallback, check_layout
from arbor_titan.context.config import ContextConfig
from arbor_titan.context.schedule import ContextSchedule, ContextShape
from arbor_titan.distributed.parallel_dims import ParallelDims, ParallelismConfig
from arbor_titan.distributed.pipeline import stage_module
from arbor_titan.models.arbor import FLAVORS, Transformer


def trainer_with(parallelism: ParallelismConfig, context: ContextConfig, val_seq_len: int = 0):
    """What `check_layout` reads of a trainer: the config and the parallel degrees."""
    cfg = JobConfig(parallelism=parallelism, context=context)
    cfg.validation.seq_len = val_seq_len
    return SimpleNamespace(cfg=cfg, dims=ParallelDims.from_config(parallelism, world_size=2))


def stages(*seq_lens: int, keep_tokens: bool = False) -> ContextConfig:
    table = [{"step": 10 * (i + 1), "seq_len": n} for i, n in enumerate(seq_lens)]
    return ContextConfig(
        schedule="stages", schedule_params={"stages": table}, keep_tokens_per_step=keep_tokens
    )


def check(context: ContextConfig, parallelism: ParallelismConfig, val_seq_len: int = 0) -> None:
    schedule = build_context_schedule(context, seq_len=64, local_batch_size=4)
    check_layout(schedule.shapes(), trainer_with(parallelism, context, val_seq_len))


TP = ParallelismConfig(tensor_parallel_degree=2)
PP = ParallelismConfig(pipeline_parallel_degree=2)


def test_every_length_must_split_over_sequence_parallel_ranks():
    check(stages(128, 256), TP)
    with pytest.raises(
        ConfigError,
        match=r"context.schedule: sequence length 129 is not divisible by "
        r"parallelism.tensor_parallel_degree=2",
    ):
        check(stages(128, 129), TP)
    with pytest.raises(ConfigError, match=r"validation.seq_len: sequence length 97"):
        check(stages(128), TP, val_seq_len=97)
    # The constant schedule's length is the [training] key's.
    trainer = trainer_with(TP, ContextConfig())
    trainer.cfg.training.seq_len = 65
    constant = build_context_schedule(ContextConfig(), seq_len=65, local_batch_size=4)
    with pytest.raises(ConfigError, match=r"training.seq_len: sequence length 65"):
        check_layout(constant.shapes(), trainer)


def test_every_micro_batch_must_split_into_pipeline_microbatches():
    # 64 x 4 tokens: 2 sequences of 128 split over 2 microbatches, 1 of 256 doesn't.
    check(stages(128, keep_tokens=True), PP)
    with pytest.raises(
        ConfigError,
        match=r"context.keep_tokens_per_step: the micro-batch of 1 sequences \(at length 256\) "
        r"must be divisible by parallelism.pipeline_parallel_microbatches=2",
    ):
        check(stages(128, 256, keep_tokens=True), PP)


def test_pipeline_stages_rotate_by_their_new_args():
    """set_context gives every part the new args; a stage (a shallow copy of the model) then
    computes RoPE under the new scaling while the model it was cut from keeps its own."""
    args = FLAVORS["debug"]
    model = Transformer(args)
    stage = stage_module(model, range(2, 4), False, True)
    stage.args = replace(args, rope_scaling={"type": "linear", "factor": 2.0})
    scaled, plain = stage.rope_frequencies()[0], model.rope_frequencies()[0]
    assert scaled.allclose(plain / 2)


class DoublingSchedule(ContextSchedule):
    """Doubles the length at the first loss under 1: a schedule with state that reads the loss."""

    reads_loss = True

    def __init__(self, base: ContextShape, params, keep_tokens_per_step: bool = False):
        super().__init__(base, params, keep_tokens_per_step)
        self.doubled_at: int | None = None

    def observe(self, step: int, loss: float) -> None:
        if self.doubled_at is None and loss < 1:
            self.doubled_at = step

    def shape(self, step: int) -> ContextShape:
        longer = self.doubled_at is not None and step >= self.doubled_at
        return self.shape_for(self.base.seq_len * (2 if longer else 1), self.base.rope)

    def shapes(self) -> list[ContextShape]:
        return [
            self.shape_for(n, self.base.rope) for n in (self.base.seq_len, 2 * self.base.seq_len)
        ]

    def state_dict(self) -> dict:
        return {"doubled_at": self.doubled_at}

    def load_state_dict(self, state: dict) -> None:
        self.doubled_at = state["doubled_at"]


@pytest.fixture
def doubling(monkeypatch):
    """Registered for one test only, so other tests see the built-in names alone."""
    monkeypatch.setitem(registry._registry["context_schedule"], "test_doubling", DoublingSchedule)


def doubling_callback() -> ContextCallback:
    return ContextCallback(ContextConfig(schedule="test_doubling"), TrainingConfig(seq_len=64))


def test_a_schedule_reads_the_loss_and_its_state_survives_a_checkpoint(doubling, caplog):
    callback = doubling_callback()
    for step, loss in ((1, 2.0), (2, 0.5), (3, 0.4)):
        trainer = SimpleNamespace(
            state=SimpleNamespace(step=step), last_loss=loss, reduce_loss=lambda loss: loss
        )
        callback.on_step_end(trainer)
    assert callback.schedule.shape(1).seq_len == 64 and callback.schedule.shape(2).seq_len == 128
    assert callback.schedule.max_seq_len == 128
    saved = callback.state_dict()
    assert saved == {"schedule": "test_doubling", "state": {"doubled_at": 2}}
    resumed = doubling_callback()
    resumed.load_state_dict(saved)
    assert resumed.schedule.shape(2).seq_len == 128
    # Another schedule's state isn't forced on this one: it starts afresh, and says so.
    switched = doubling_callback()
    switched.load_state_dict({"schedule": "warmup", "state": {"doubled_at": 2}})
    assert switched.schedule.doubled_at is None
    assert "the checkpoint's was 'warmup'" in caplog.text
