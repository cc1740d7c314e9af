"""The throughput window waits for the device before it reads the clock on logged steps, so
work still queued on a GPU counts; unlogged steps don't wait."""

import time

import torch

from arbor_titan.metrics.window import ThroughputWindow

QUEUED_WORK_S = 0.05


def test_a_synchronized_stop_counts_the_queued_work(monkeypatch):
    waits = []

    def synchronize(device):  # what a GPU with QUEUED_WORK_S of kernels left would do
        waits.append(device)
        time.sleep(QUEUED_WORK_S)

    monkeypatch.setattr(torch.accelerator, "synchronize", synchronize)
    device = torch.device("cuda", 0)
    window = ThroughputWindow(device)
    window.start()
    window.stop(tokens=100, flops_per_token=10, synchronize_device=False)
    assert waits == [] and window.seconds < QUEUED_WORK_S
    window.start()
    window.stop(tokens=300, flops_per_token=30, synchronize_device=True)
    assert waits == [device] and window.seconds >= QUEUED_WORK_S
    assert window.tokens_per_second == 400 / window.seconds
    assert window.flops_per_token == (100 * 10 + 300 * 30) / 400  # the window's mean
    window.reset()
    assert (window.seconds, window.tokens, window.flops) == (0.0, 0, 0)


def test_cpu_steps_never_wait(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device: 1 / 0)
    window = ThroughputWindow(torch.device("cpu"))
    window.start()
    window.stop(tokens=10, flops_per_token=1, synchronize_device=True)
    assert window.tokens == 10
