"""Tensor parallel degrees that split the query heads but not the kv heads: wk/wv replicated
over tp, each rank projecting the kv heads its query heads read (models/arbor/parallelize.py).

The training runs use `debug_kv6` (12 query heads over 6 kv heads, see kv_replication_train.py)
at tp 4, where rank r's 3 query heads read kv heads (3r)//2 ... (3r+2)//2: unevenly, and a kv
head where two ranks meet is projected on both. tp 8 (the 200b flavor's layout) is checked
here rank by rank in one process.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor

from arbor_titan.estimate.ranks import fake_process_group
from arbor_titan.models.arbor import FLAVORS, ArborArgs
from arbor_titan.models.arbor.parallelize import ReplicatedKV, kv_heads_read, replicates_kv
from tests.conftest import losses, run_training, step_metrics

SCRIPT = str(Path(__file__).with_name("kv_replication_train.py"))
TRAIN = [sys.executable, SCRIPT]
TRAIN_TP4 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
KV6 = [
    "--model.flavor=debug_kv6",
    "--training.local_batch_size=2",
    "--training.steps=2",
    "--metrics.enable_tensorboard=false",
]


def test_tp_8_of_the_200b_flavor_reads_two_kv_heads_per_rank():
    args = FLAVORS["200b"]
    assert replicates_kv(args.n_kv_heads, 8) and not replicates_kv(args.n_kv_heads, 4)
    reads = [kv_heads_read(args.n_heads, args.n_kv_heads, 8, rank) for rank in range(8)]
    pairs = [[0, 1], [1, 2], [3, 4], [4, 5], [6, 7], [7, 8], [9, 10], [10, 11]]
    assert [sorted(set(r)) for r in reads] == pairs
    assert sum(reads, []) == [head // 8 for head in range(96)]  # query head h reads h // 8


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "tp"), [(24, 3, 8), (12, 6, 4), (6, 3, 2)])
def test_ranks_keys_values_and_summed_gradients_match_the_whole_projection(n_heads, n_kv_heads, tp):
    """Every tp rank's k/v (one kv head per local query head) equal the unsplit projection's,
    and the ranks' weight and input gradients, summed (what the Partial placements ask DTensor
    to do across tp), equal the unsplit ones."""
    head_dim, dim, group = 4, 16, n_heads // n_kv_heads
    args = ArborArgs(dim, 1, n_heads, n_kv_heads, ffn_dim=32, vocab_size=8, head_dim=head_dim)
    generator = torch.Generator().manual_seed(0)
    x_bsd = torch.randn(2, 5, dim, generator=generator).requires_grad_()
    wk, wv = (
        torch.randn(n_kv_heads * head_dim, dim, generator=generator).requires_grad_() for _ in "kv"
    )
    grad_k, grad_v = (torch.randn(2, 5, n_heads, head_dim, generator=generator) for _ in "kv")
    k, v = (
        (x_bsd @ w.T).unflatten(-1, (n_kv_heads, head_dim)).repeat_interleave(group, dim=2)
        for w in (wk, wv)
    )
    ((k * grad_k).sum() + (v * grad_v).sum()).backward()
    with fake_process_group(0, 1):
        mesh = init_device_mesh("cpu", (1,))
        leaves = [
            distribute_tensor(t.detach(), mesh, [Replicate()]).requires_grad_()
            for t in (x_bsd, wk, wv)
        ]
        local = n_heads // tp
        for rank in range(tp):
            heads = slice(rank * local, (rank + 1) * local)
            k_rank, v_rank = ReplicatedKV.for_rank(args, tp, rank)(*leaves)
            torch.testing.assert_close(k_rank, k[:, :, heads])
            torch.testing.assert_close(v_rank, v[:, :, heads])
            loss = (k_rank * grad_k[:, :, heads]).sum() + (v_rank * grad_v[:, :, heads]).sum()
            loss.backward()  # accumulates into the leaves: the sum over ranks
        for leaf, whole in zip(leaves, (x_bsd, wk, wv)):
            torch.testing.assert_close(leaf.grad.full_tensor(), whole.grad)


@pytest.fixture(scope="module")
def single_process(dump_folder) -> dict[int, float]:
    run_training(dump_folder, "kv6_single", *KV6, "--checkpoint.enable=false", script=TRAIN)
    return step_metrics(dump_folder, "kv6_single")


def test_tp_4_replicating_kv_matches_one_process_and_resumes_at_tp_1(dump_folder, single_process):
    """Per-step losses and gradient norms (the replicated weights' gradients summed over tp) at
    tp 4 equal one process's; its step-1 checkpoint (kv weights replicated over tp) loads into
    one process and trains step 2 to the same loss."""
    tp4 = [*KV6, "--parallelism.tensor_parallel_degree=4", "--checkpoint.interval=1"]
    run_training(dump_folder, "kv6_tp4", *tp4, script=[*TRAIN_TP4, SCRIPT], timeout=600)
    got = step_metrics(dump_folder, "kv6_tp4")
    assert sorted(got) == [1, 2]
    for step, record in got.items():
        reference = single_process[step]
        assert record["loss"] == pytest.approx(reference["loss"], abs=1e-5), (got, reference)
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)

    shutil.rmtree(dump_folder / "kv6_tp1", ignore_errors=True)
    shutil.copytree(dump_folder / "kv6_tp4", dump_folder / "kv6_tp1")
    (dump_folder / "kv6_tp1" / "metrics.jsonl").unlink()
    resume = ["--checkpoint.load_step=1", "--checkpoint.interval=1000"]
    run_training(dump_folder, "kv6_tp1", *KV6, *resume, script=TRAIN)
    resumed = losses(dump_folder, "kv6_tp1")
    assert sorted(resumed) == [2]
    assert resumed[2] == pytest.approx(got[2]["loss"], abs=1e-5)


def test_replicated_kv_compiles_in_one_graph():
    """The 200b config compiles its blocks: the projection, with its Partial gradient
    placements, traces into one graph (aot_eager: dynamo and AOT autograd, no kernel build)
    and gives the eager values and weight gradient."""
    args = ArborArgs(16, 1, 12, 6, ffn_dim=32, vocab_size=8, head_dim=4)
    replicated_kv = ReplicatedKV.for_rank(args, 4, 1)

    def loss(*inputs: torch.Tensor) -> torch.Tensor:
        k, v = replicated_kv(*inputs)
        return (2 * k + v).sum()

    with fake_process_group(0, 1):
        mesh = init_device_mesh("cpu", (1,))
        shapes = [(2, 5, 16), (24, 16), (24, 16)]
        leaves = [
            distribute_tensor(torch.randn(shape), mesh, [Replicate()]).requires_grad_()
            for shape in shapes
        ]
        eager = loss(*leaves)
        eager.backward()
        eager_grad, leaves[1].grad = leaves[1].grad.full_tensor(), None
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves)
        compiled.backward()
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(leaves[1].grad.full_tensor(), eager_grad)
