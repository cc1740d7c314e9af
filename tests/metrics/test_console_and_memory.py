"""Console format per rank, peak memory on CPU, and the [metrics] section's checks."""

import dataclasses
import logging
import re

import pytest
import torch

from arbor_titan.metrics import MetricsConfig, memory_gib, reset_peak_memory, setup_console_logging


@pytest.fixture
def console():
    """Restore the `arbor_titan` logger afterwards: setup changes process-wide state."""
    logger = logging.getLogger("arbor_titan")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_console_lines_carry_rank_and_time(console, capsys):
    setup_console_logging(rank=3, show=True)
    setup_console_logging(rank=3, show=True)  # a second setup must not print twice
    logging.getLogger("arbor_titan.trainer").info("hello")
    assert re.fullmatch(r"\[rank3\] \d\d:\d\d:\d\d hello\n", capsys.readouterr().out)


def test_hidden_ranks_still_show_warnings(console, capsys):
    setup_console_logging(rank=1, show=False)
    logging.getLogger("arbor_titan").info("step line")
    logging.getLogger("arbor_titan").warning("disk full")
    out = capsys.readouterr().out
    assert "step line" not in out
    assert out.endswith(" disk full\n")


def test_cpu_memory_is_the_process_peak_rss():
    before = memory_gib(torch.device("cpu"))
    assert 0.01 < before < 1024
    reset_peak_memory(torch.device("cpu"))  # no-op on CPU: the peak cannot be lowered
    assert memory_gib(torch.device("cpu")) >= before


def test_metrics_config():
    assert all(f.metadata.get("help") for f in dataclasses.fields(MetricsConfig))
