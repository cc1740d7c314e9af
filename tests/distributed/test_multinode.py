"""Two torchrun agents on localhost (c10d rendezvous, 2 processes each) train like one node of 4,
launched exactly as users launch several nodes: NNODES, NODE_RANK, RDZV_ENDPOINT."""

import os
import socket
import subprocess

from tests.conftest import FAST_TRAINING, REPO, losses, run_training

FOUR_RANKS = ["--training.steps=3", "--training.local_batch_size=1", "--checkpoint.enable=false"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_match_one_node(dump_folder):
    run_training(dump_folder, "one_node", *FOUR_RANKS, nproc=4)
    endpoint = f"127.0.0.1:{free_port()}"
    args = [
        str(REPO / "run_train.sh"),
        str(REPO / "train_configs/debug_model.toml"),
        f"--job.dump_folder={dump_folder}",
        "--job.name=two_nodes",
        *FAST_TRAINING,
        *FOUR_RANKS,
    ]
    env = {
        **os.environ,
        "NGPU": "2",
        "NNODES": "2",
        "RDZV_ENDPOINT": endpoint,
        "OMP_NUM_THREADS": "1",
    }
    nodes = [
        subprocess.Popen(
            args,
            cwd=REPO,
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert "dp_shard 4" in outputs[0]
    assert losses(dump_folder, "two_nodes") == losses(dump_folder, "one_node")
