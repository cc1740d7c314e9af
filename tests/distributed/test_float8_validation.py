"""float8's needs of the other sections stop a config as it loads, naming the keys: the tokens
of a micro-batch per tensor-parallel rank in multiples of 16, and bf16 for rowwise scaling."""

import pytest

from arbor_titan.config.cli import load_config
from arbor_titan.distributed.float8 import check_float8_layout

FLOAT8 = ["--float8.enable_float8_linear=true"]


def test_a_tensor_parallel_share_of_tokens_off_the_multiple_of_16_stops():
    # 1 x 40 tokens is not a multiple of 16; 1 x 48 is, but not its 24 per TP rank.
    for shape in (
        ["--training.local_batch_size=1", "--training.seq_len=40"],
        [
            "--training.local_batch_size=1",
            "--training.seq_len=48",
            "--parallelism.tensor_parallel_degree=2",
        ],
    ):
        with pytest.raises(ValueError, match=r"multiple of 16") as error:
            load_config(None, [*FLOAT8, *shape])
        message = str(error.value)
        for key in ("training.local_batch_size", "training.seq_len", "tensor_parallel_degree"):
            assert key in message


def test_pipeline_micro_batches_count_their_own_tokens():
    # 8 sequences of 16 tokens split into 4 pipeline micro-batches: 32 tokens each, fine; into
    # 8 micro-batches: 16, fine; 2 sequences of 24 in 2 micro-batches: 24, refused.
    pipeline = ["--parallelism.pipeline_parallel_degree=2"]
    load_config(
        None,
        [
            *FLOAT8,
            *pipeline,
            "--training.local_batch_size=8",
            "--training.seq_len=16",
            "--parallelism.pipeline_parallel_microbatches=8",
        ],
    )
    with pytest.raises(ValueError, match=r"2 pipeline micro-batches\) 1 x training.seq_len 24"):
        load_config(
            None, [*FLOAT8, *pipeline, "--training.local_batch_size=2", "--training.seq_len=24"]
        )


def test_rowwise_needs_bf16():
    rowwise = [*FLOAT8, "--float8.recipe_name=rowwise"]
    with pytest.raises(ValueError, match=r"training.mixed_precision_param = 'bfloat16'"):
        load_config(None, [*rowwise, "--training.mixed_precision_param=float32"])
    cfg = load_config(None, [*rowwise, "--training.mixed_precision_param=bfloat16"])
    assert cfg.float8.recipe_name == "rowwise"


def test_without_float8_nothing_is_asked():
    cfg = load_config(None, ["--training.seq_len=40", "--training.local_batch_size=1"])
    assert not cfg.float8.enable_float8_linear


def test_context_parallel_ranks_split_the_tokens_too():
    # 1 x 64 tokens over cp 2: 32 per rank, fine; over cp 2 x tp 4: 8 per rank, refused.
    cp = ["--training.local_batch_size=1", "--training.seq_len=64"]
    load_config(None, [*FLOAT8, *cp, "--parallelism.context_parallel_degree=2"])
    with pytest.raises(ValueError, match=r"context_parallel_degree 2\) = 8"):
        load_config(
            None,
            [
                *FLOAT8,
                *cp,
                "--parallelism.context_parallel_degree=2",
                "--parallelism.tensor_parallel_degree=4",
            ],
        )


def test_float8_all_gather_without_fsdp_stops():
    cfg = load_config(None, [*FLOAT8, "--float8.enable_fsdp_float8_all_gather=true"])
    with pytest.raises(ValueError, match="enable_fsdp_float8_all_gather needs FSDP"):
        check_float8_layout(cfg.float8, fsdp_enabled=False)
    check_float8_layout(cfg.float8, fsdp_enabled=True)
    check_float8_layout(load_config(None, FLOAT8).float8, fsdp_enabled=False)
