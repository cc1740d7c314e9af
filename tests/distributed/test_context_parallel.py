"""Context parallelism: the load-balanced layout, the exact attentions, and training losses equal
to one process's under cp 4, cp × FSDP2, cp × PP, and after a resume under cp × TP."""

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention.bias import causal_lower_right

from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import ConfigError
from arbor_titan.context.build import build_context_schedule
from arbor_titan.context.callback import check_layout
from arbor_titan.context.config import ContextConfig
from arbor_titan.distributed.context_parallel import (
    ContextParallel,
    ReversedPrefixCausal,
    check_attention_runs_here,
    chunk_positions,
)
from arbor_titan.distributed.parallel_dims import ParallelDims, ParallelismConfig
from arbor_titan.models.arbor.masking import document_sdpa_mask
from tests.conftest import losses, run_training

CP = "--parallelism.context_parallel_degree"


def test_ranks_hold_a_head_and_a_tail_chunk_that_tile_the_sequence():
    degree, chunk_len = 4, 3
    held = [chunk_positions(rank, degree, chunk_len, torch.device("cpu")) for rank in range(4)]
    assert held[0].tolist() == [0, 1, 2, 21, 22, 23]  # chunks 0 and 7 of 8
    assert held[3].tolist() == [9, 10, 11, 12, 13, 14]  # chunks 3 and 4: the middle
    assert sorted(torch.cat(held).tolist()) == list(range(2 * degree * chunk_len))
    # Causal attention work (keys each query may see) is the same on every rank.
    work = {int((positions + 1).sum()) for positions in held}
    assert len(work) == 1


def test_reversed_prefix_mask_is_exact_and_keeps_no_quadratic_tensor():
    chunk, prefix = 32, 128  # the tail chunk 3 of a sequence cut into 4 chunks of 32
    torch.manual_seed(0)
    q = torch.randn(2, 4, chunk, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, prefix, 16, requires_grad=True) for _ in range(2))
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(chunk, prefix), enable_gqa=True
    )
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    saved_elements = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved_elements.append(t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = ReversedPrefixCausal(chunk, prefix).attend(q, k, v, gqa=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for grad, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-6)
    # Backward keeps q, k, v, the output, the log-sum-exp and the mask's vector: no
    # chunk × prefix tensor (the materialized lower-right mask would be 4,096 elements).
    assert max(saved_elements) == 2 * 2 * prefix * 16
    assert chunk + prefix - 1 in saved_elements


def test_cp_ranks_join_the_fsdp_shards_and_the_world_size():
    dims = ParallelDims.from_config(ParallelismConfig(context_parallel_degree=2), 8)
    assert (dims.dp_shard, dims.cp, dims.dp) == (4, 2, 4)
    assert ParallelDims.from_config(ParallelismConfig(context_parallel_degree=2), 2).fsdp_enabled
    with pytest.raises(ValueError, match=r"replicate × cp × tp × pp"):
        ParallelDims.from_config(ParallelismConfig(context_parallel_degree=4), 6)


def test_context_schedule_lengths_must_split_into_cp_chunks():
    parallelism = ParallelismConfig(context_parallel_degree=2)
    table = [{"step": 10, "seq_len": 128}, {"step": 20, "seq_len": 130}]
    context = ContextConfig(schedule="stages", schedule_params={"stages": table})
    cfg = JobConfig(parallelism=parallelism, context=context)
    trainer = SimpleNamespace(cfg=cfg, dims=ParallelDims.from_config(parallelism, 2))
    schedule = build_context_schedule(context, seq_len=64, local_batch_size=4)
    with pytest.raises(ConfigError, match=r"context.schedule: sequence length 130 .* 2 × "):
        check_layout(schedule.shapes(), trainer)


# Each attention against full SDPA: (process group backend, documents too, atol, rtol).
ATTENTION_CHECKS = {
    "all_gather": ("gloo", True, 1e-6, 1e-5),
    "torch_ring": ("nccl", False, 1e-4, 1e-4),
}


def _attention_worker(rank: int, world_size: int, init_file: str, method: str) -> None:
    """Each rank attends its chunks with ContextParallel.attention; outputs and the gradients of
    its queries, keys and values must equal those of full attention at its positions."""
    backend, with_documents, atol, rtol = ATTENTION_CHECKS[method]
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh(device.type, (2,), mesh_dim_names=("cp",))
        cp = ContextParallel(mesh.get_group(), method, mesh)
        with pytest.raises(ValueError, match=r"training.seq_len=66 must be divisible by 2 × "):
            cp.check_seq_len(66)
        generator = torch.Generator().manual_seed(0)
        bsz, seq_len, head_dim = 2, 16, 8

        def randn(*shape: int, grad: bool = True) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device).requires_grad_(grad)

        q = randn(bsz, 4, seq_len, head_dim)
        k, v = randn(bsz, 2, seq_len, head_dim), randn(bsz, 2, seq_len, head_dim)
        weight = randn(bsz, 4, seq_len, head_dim, grad=False)
        starts = torch.rand(bsz, seq_len, generator=generator).to(device) < 0.25
        documents = (None, torch.cumsum(starts, dim=1)) if with_documents else (None,)
        for document_ids in documents:
            full_mask = None if document_ids is None else document_sdpa_mask(document_ids)
            full = F.scaled_dot_product_attention(
                q, k, v, attn_mask=full_mask, is_causal=full_mask is None, enable_gqa=True
            )
            grads = torch.autograd.grad((full * weight).sum(), (q, k, v))
            local = [cp.shard(t.detach(), dim=2).requires_grad_() for t in (q, k, v)]
            local_ids = None if document_ids is None else cp.shard(document_ids)
            out = cp.attention(*local, cp.masks(seq_len // 2, local_ids, q.device))
            local_grads = torch.autograd.grad((out * cp.shard(weight, dim=2)).sum(), local)
            torch.testing.assert_close(out, cp.shard(full, dim=2), atol=atol, rtol=rtol)
            for got, want in zip(local_grads, grads):
                torch.testing.assert_close(got, cp.shard(want, dim=2), atol=atol, rtol=rtol)
    finally:
        dist.destroy_process_group()


def spawn_attention_check(tmp_path, method: str) -> None:
    # fork: the workers start in a second instead of re-importing torch (CUDA is first touched
    # in the workers).
    mp.start_processes(
        _attention_worker, args=(2, str(tmp_path / "init"), method), nprocs=2, start_method="fork"
    )


def test_cp_attention_equals_full_attention_with_and_without_documents(tmp_path):
    spawn_attention_check(tmp_path, "all_gather")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_torch_ring_attention_equals_full_attention_on_two_gpus(tmp_path):
    spawn_attention_check(tmp_path, "torch_ring")


def test_torch_ring_attention_is_refused_where_it_cannot_run():
    key = r'parallelism.context_parallel_attention = "torch_ring"'
    with pytest.raises(ValueError, match=key + r' needs CUDA: .* on cpu use "all_gather"'):
        check_attention_runs_here("torch_ring", torch.device("cpu"), document_mask=False)
    with pytest.raises(ValueError, match=key + r" computes plain causal .* data.document_mask"):
        check_attention_runs_here("torch_ring", torch.device("cuda"), document_mask=True)
    check_attention_runs_here("torch_ring", torch.device("cuda"), document_mask=False)
    check_attention_runs_here("all_gather", torch.device("cpu"), document_mask=True)
    with pytest.raises(ValueError, match=r"context_parallel_attention must be one of all_gather, "):
        ParallelismConfig(context_parallel_degree=2, context_parallel_attention="ring")
    with pytest.raises(ValueError, match=r"needs parallelism.context_parallel_degree > 1"):
        ParallelismConfig(context_parallel_attention="torch_ring")


STEPS = ["--training.steps=4", "--checkpoint.interval=1000"]


@pytest.fixture(scope="module")
def reference(dump_folder) -> dict[int, float]:
    run_training(dump_folder, "cp_reference", *STEPS)
    return losses(dump_folder, "cp_reference")


@pytest.fixture(scope="module")
def cp_fsdp_saved(dump_folder) -> dict[int, float]:
    """CP 2 × FSDP2 2, checkpointing at step 2."""
    run_training(
        dump_folder,
        "cp_fsdp",
        "--training.steps=4",
        "--checkpoint.interval=2",
        f"{CP}=2",
        "--training.local_batch_size=2",
        nproc=4,
    )
    return losses(dump_folder, "cp_fsdp")


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, got, want)


@pytest.mark.slow
def test_cp_with_fsdp_matches_one_process(reference, cp_fsdp_saved):
    assert_same_losses(cp_fsdp_saved, reference, range(1, 5))


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [[f"{CP}=4"], [f"{CP}=2", "--parallelism.pipeline_parallel_degree=2"]],
    ids=["cp4", "cp2_pp2"],
)
def test_cp_alone_and_with_pipeline_matches_one_process(dump_folder, reference, layout):
    """4 ranks: cp 4 (FSDP2 shards over the cp ranks), and cp 2 × 2 pipeline stages."""
    job = "cp_" + "_".join(o.rsplit("=", 1)[1] for o in layout)
    run_training(dump_folder, job, *STEPS, *layout, nproc=4)
    assert_same_losses(losses(dump_folder, job), reference, range(1, 5))


@pytest.mark.slow
def test_cp_checkpoint_resumes_under_cp_with_tp(dump_folder, cp_fsdp_saved):
    """Saved by cp 2 × FSDP 2, resumed by cp 2 × TP 2: another sharding of every weight, and
    the two steps after the resume run context parallel attention on TP's local heads."""
    job = "cp_resumed_tp"
    shutil.rmtree(dump_folder / job, ignore_errors=True)
    shutil.copytree(dump_folder / "cp_fsdp", dump_folder / job)
    (dump_folder / job / "metrics.jsonl").unlink()
    tp = "--parallelism.tensor_parallel_degree=2"
    run_training(dump_folder, job, *STEPS, "--checkpoint.load_step=2", f"{CP}=2", tp, nproc=4)
    assert_same_losses(losses(dump_folder, job), cp_fsdp_saved, (3, 4))
