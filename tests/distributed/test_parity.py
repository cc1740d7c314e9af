"""Every parallelism, alone and composed, trains with the same per-step losses as one process.

All runs start from the weights of the same `training.seed` with no seed checkpoint
(initialization does not depend on the layout) and see the same global batch of 4 sequences
per step. Every pipeline schedule README lists runs here.
"""

import shutil

import pytest

from tests.conftest import losses, run_training

STEPS = 3
COMMON = [f"--training.steps={STEPS}", "--checkpoint.interval=1000"]
PP = "--parallelism.pipeline_parallel_degree=2"


@pytest.fixture(scope="module")
def reference(dump_folder) -> dict[int, float]:
    run_training(dump_folder, "parity_single", *COMMON)
    return losses(dump_folder, "parity_single")


LAYOUTS = {
    "fsdp2": (2, ["--training.local_batch_size=2"]),
    "hsdp_2x2": (
        4,
        ["--training.local_batch_size=1", "--parallelism.data_parallel_replicate_degree=2"],
    ),
    "tp_sp_loss_parallel": (2, ["--parallelism.tensor_parallel_degree=2"]),
    "fsdp_x_tp": (4, ["--training.local_batch_size=2", "--parallelism.tensor_parallel_degree=2"]),
    "pp_gpipe": (2, [PP, "--parallelism.pipeline_parallel_schedule=GPipe"]),
    "pp_1f1b": (2, [PP, "--parallelism.pipeline_parallel_schedule=1F1B"]),
    "pp_interleaved": (2, [PP, "--parallelism.pipeline_parallel_schedule=Interleaved1F1B"]),
    "pp_looped_bfs": (2, [PP, "--parallelism.pipeline_parallel_schedule=LoopedBFS"]),
    "pp_interleaved_zero_bubble": (
        2,
        [PP, "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble"],
    ),
    "pp_zero_bubble_v": (2, [PP, "--parallelism.pipeline_parallel_schedule=ZBVZeroBubble"]),
    "pp_dualpipe_v": (2, [PP, "--parallelism.pipeline_parallel_schedule=DualPipeV"]),
    "pp_x_fsdp_x_tp": (
        8,
        [PP, "--training.local_batch_size=2", "--parallelism.tensor_parallel_degree=2"],
    ),
    "fsdp_full_ac": (2, ["--training.local_batch_size=2", "--activation_checkpoint.mode=full"]),
    "fsdp_selective_ac_layers": (
        2,
        [
            "--training.local_batch_size=2",
            "--activation_checkpoint.mode=selective",
            "--activation_checkpoint.selective_ac_option=2",
        ],
    ),
    "fsdp_selective_ac_ops": (
        2,
        [
            "--training.local_batch_size=2",
            "--activation_checkpoint.mode=selective",
            "--activation_checkpoint.selective_ac_option=op",
        ],
    ),
    "fsdp_compile": (2, ["--training.local_batch_size=2", "--compile.enable=true"]),
    "fsdp_cpu_offload": (2, ["--training.local_batch_size=2", "--training.cpu_offload=true"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_match_one_process(dump_folder, reference, layout):
    nproc, overrides = LAYOUTS[layout]
    job = f"parity_{layout}"
    run_training(dump_folder, job, *COMMON, *overrides, nproc=nproc, timeout=600)
    got = losses(dump_folder, job)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(reference[step], abs=1e-5), (step, got, reference)


@pytest.mark.parametrize(
    ("layout", "nproc", "overrides"),
    [
        ("tp2", 2, ["--parallelism.tensor_parallel_degree=2", "--training.local_batch_size=4"]),
        ("pp2", 2, [PP, "--training.local_batch_size=4"]),
        ("single", 1, ["--training.local_batch_size=4"]),
    ],
)
def test_fsdp_checkpoint_resumes_under_other_layouts(
    dump_folder, layout, nproc, overrides, fsdp_saved
):
    job = f"reshard_{layout}"
    shutil.rmtree(dump_folder / job, ignore_errors=True)
    shutil.copytree(dump_folder / "reshard_fsdp", dump_folder / job)
    (dump_folder / job / "metrics.jsonl").unlink()
    run_training(
        dump_folder,
        job,
        "--training.steps=4",
        "--checkpoint.load_step=2",
        "--checkpoint.interval=1000",
        *overrides,
        nproc=nproc,
    )
    got, saved = losses(dump_folder, job), losses(dump_folder, "reshard_fsdp")
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(saved[step], abs=1e-5), (step, got, saved)


@pytest.fixture(scope="module")
def fsdp_saved(dump_folder) -> None:
    run_training(
        dump_folder,
        "reshard_fsdp",
        "--training.steps=4",
        "--checkpoint.interval=2",
        "--training.local_batch_size=2",
        nproc=2,
    )
