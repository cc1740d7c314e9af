"""The planner's memory estimate against what a real training step allocates, at small scale.

The bench model (seq 256, batch 2) runs one step on CPU with 1 process (bf16 autocast, no FSDP)
and with 2 processes (FSDP2 bf16 mixed precision), each without, with full and with selective
activation checkpointing; memory_worker.py documents how each number is measured.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arbor_titan.config.cli import load_config
from arbor_titan.estimate import EstimateOptions, MemoryOptions, plan
from tests.estimate.memory_worker import BASE, VOCAB

WORKER = Path(__file__).with_name("memory_worker.py")
REPO = WORKER.parents[2]
BF16 = "--training.mixed_precision_param=bfloat16"
CASES = {
    "no_ac": [BF16],
    "full_ac": [BF16, "--activation_checkpoint.mode=full"],
    "op_ac": [
        BF16,
        "--activation_checkpoint.mode=selective",
        "--activation_checkpoint.selective_ac_option=op",
    ],
    "fp32_every_other_block": ["--activation_checkpoint.mode=selective"],
}
ACTIVATION_TOLERANCE = 0.25


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks_fsdp2"])
def measured(request, tmp_path_factory) -> tuple[int, list[dict]]:
    nproc = request.param
    out = tmp_path_factory.mktemp(f"memory_{nproc}")
    cases = [f"{name}:{','.join(overrides)}" for name, overrides in CASES.items()]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run(
        [*launcher, str(WORKER), str(out), *cases],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return nproc, [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def estimates(nproc: int, overrides: list[str]):
    options = EstimateOptions(
        world_size=nproc, vocab_size=VOCAB, memory=MemoryOptions(device="cpu"), ranks="all"
    )
    result = plan(load_config(None, BASE + overrides), options)
    return result.dims.fsdp_enabled, [r.memory for r in result.ranks]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_estimate_matches_a_real_step(measured, case):
    nproc, per_rank = measured
    fsdp, memories = estimates(nproc, CASES[case])
    assert fsdp == (nproc > 1)
    for rank, (real, est) in enumerate(zip((r[case] for r in per_rank), memories)):
        where = f"{case}, rank {rank}/{nproc}"
        # Shards of parameters, gradients and AdamW state: exact to the byte.
        assert est.parameters == real["params"], where
        assert est.gradients == real["grads"], where
        assert est.optimizer == real["optimizer"], where
        # Without FSDP, bf16 runs under autocast, whose cached weight casts the probe sees.
        autocast_copies = 0 if fsdp else est.gathered_weights
        held = est.activations + autocast_copies
        assert held == pytest.approx(real["held"], rel=ACTIVATION_TOLERANCE), where
        if real["peak"] is not None:
            peak = held + est.backward_working
            assert peak == pytest.approx(real["peak"], rel=ACTIVATION_TOLERANCE), where
