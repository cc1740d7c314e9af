"""The example context schedule and RoPE scaling of plugins/README.md run as written: each
registers, is built from its TOML settings, and behaves as its text says."""

import re

import pytest
import torch

from arbor_titan import registry
from arbor_titan.context.build import build_context_schedule
from arbor_titan.context.config import ContextConfig
from arbor_titan.models.arbor.rope import plain_inv_freq, rope_cos_sin
from tests.conftest import REPO

SECTION = "## Context schedules and RoPE scalings"


@pytest.fixture(scope="module", autouse=True)
def readme_plugins():
    """Run the section's Python blocks; remove their registrations afterwards."""
    text = (REPO / "plugins/README.md").read_text().split(SECTION, 1)[1]
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "plugins/README.md", "exec"), {})
    yield
    registry._registry["context_schedule"].pop("double_on_plateau")
    registry._registry["rope_scaling"].pop("half_interpolation")


def test_double_on_plateau_doubles_after_patience_and_survives_a_checkpoint():
    cfg = ContextConfig(
        schedule="double_on_plateau", schedule_params={"start_seq_len": 64, "patience": 2}
    )
    schedule = build_context_schedule(cfg, seq_len=256, local_batch_size=4)
    assert [s.seq_len for s in schedule.shapes()] == [64, 128, 256]
    for step, loss in enumerate([5.0, 5.1, 5.2], start=1):
        schedule.observe(step, loss)
    assert schedule.shape(3).seq_len == 128
    resumed = build_context_schedule(cfg, seq_len=256, local_batch_size=4)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.shape(3).seq_len == 128


def test_half_interpolation_scales_the_slow_half_only():
    table = rope_cos_sin(8, 16, 10000.0, {"type": "half_interpolation", "factor": 4.0})
    plain = plain_inv_freq(8, 10000.0)
    expected = torch.cat([plain[:2], plain[2:] / 4])
    angles = torch.outer(torch.arange(16, dtype=torch.float64), expected)
    assert torch.allclose(table[0, :, :4].double(), angles.cos(), atol=1e-6)
