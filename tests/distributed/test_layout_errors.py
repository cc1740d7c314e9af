"""Layouts that cannot work fail before anything is built, with the degrees and the fix named."""

import pytest

from arbor_titan.distributed.parallel_dims import ParallelDims, ParallelismConfig
from arbor_titan.distributed.pipeline import layer_split, stage_ids_of_rank
from tests.conftest import run_training


def dims(world: int, **degrees: int) -> ParallelDims:
    return ParallelDims.from_config(ParallelismConfig(**degrees), world)


def test_degrees_must_multiply_to_the_world_size():
    with pytest.raises(ValueError, match=r"multiply to 8 .* world size is 4"):
        dims(4, data_parallel_shard_degree=2, tensor_parallel_degree=2, pipeline_parallel_degree=2)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by .* = 4"):
        dims(6, tensor_parallel_degree=4)


def test_shard_degree_fills_the_rest():
    resolved = dims(8, tensor_parallel_degree=2, pipeline_parallel_degree=2)
    assert (resolved.dp_shard, resolved.dp) == (2, 2)


def test_tp_must_divide_the_query_heads_not_the_kv_heads():
    with pytest.raises(
        ValueError, match=r"tensor_parallel_degree=4 must divide .*n_heads=6 .*degrees: 1, 2, 3, 6"
    ):
        dims(4, tensor_parallel_degree=4).validate_model(4, 6, 2, 1, False)
    dims(4, tensor_parallel_degree=4).validate_model(4, 4, 2, 1, False)  # kv heads replicated


def test_more_stages_than_layers():
    with pytest.raises(ValueError, match=r"8 pipeline stages .* exceed the model's 4 layers"):
        dims(4, pipeline_parallel_degree=4).validate_model(4, 4, 2, 8, False)


def test_tied_embeddings_refuse_tp_and_pp():
    with pytest.raises(ValueError, match="tie_embeddings"):
        dims(2, pipeline_parallel_degree=2).validate_model(4, 4, 2, 2, True)


def test_unknown_schedule_lists_the_known():
    with pytest.raises(ValueError, match="GPipe, 1F1B"):
        ParallelismConfig(pipeline_parallel_schedule="Zigzag")


def test_split_points():
    assert layer_split(5, 2, []) == [range(0, 3), range(3, 5)]
    assert layer_split(6, 3, [1, 5]) == [range(0, 1), range(1, 5), range(5, 6)]
    with pytest.raises(ValueError, match="needs 2 entries"):
        layer_split(6, 3, [2])
    with pytest.raises(ValueError, match="increasing"):
        layer_split(6, 3, [4, 2])


def test_stage_placement_loop_and_v():
    assert stage_ids_of_rank(1, 2, 2, "Interleaved1F1B") == [1, 3]
    assert stage_ids_of_rank(0, 2, 2, "ZBVZeroBubble") == [0, 3]
    with pytest.raises(ValueError, match="2 stages per rank"):
        stage_ids_of_rank(0, 2, 3, "ZBVZeroBubble")


def test_trainer_reports_a_layout_error_cleanly(dump_folder):
    result = run_training(
        dump_folder, "bad_layout", "--parallelism.tensor_parallel_degree=2", check=False
    )
    assert result.returncode != 0
    assert "world size" in result.stderr and "Traceback" not in result.stderr


def test_pipeline_microbatches_must_divide_the_batch(dump_folder):
    result = run_training(
        dump_folder,
        "bad_microbatches",
        "--parallelism.pipeline_parallel_degree=2",
        "--parallelism.pipeline_parallel_microbatches=3",
        nproc=2,
        check=False,
    )
    assert result.returncode != 0
    assert "pipeline_parallel_microbatches=3" in result.stdout + result.stderr


def test_validation_under_a_v_schedule_is_refused_up_front(dump_folder):
    result = run_training(
        dump_folder,
        "bad_v_validation",
        "--parallelism.pipeline_parallel_degree=2",
        "--parallelism.pipeline_parallel_schedule=ZBVZeroBubble",
        "--validation.enable=true",
        nproc=2,
        check=False,
    )
    assert result.returncode != 0
    assert "validation.enable=false" in result.stdout + result.stderr
