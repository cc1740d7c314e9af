"""arbor_titan/distributed/device.py: the visible-GPU check (and init_distributed's use of it),
host batches pinned and copied without blocking on CUDA only, and the TF32 switch."""

import pytest
import torch

from arbor_titan.config.cli import load_config
from arbor_titan.distributed import init
from arbor_titan.distributed.device import apply_tf32, check_visible_gpus, host_to_device

CUDA = torch.device("cuda", 0)


def test_more_processes_than_visible_gpus_stop_every_rank(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    for local_rank in (0, 1):  # rank 0 has a GPU, but its node was asked for 2
        with pytest.raises(ValueError) as error:
            check_visible_gpus(local_rank, 2, visible=1)
        message = str(error.value)
        assert "2 processes per node" in message and "1 visible GPU" in message
        assert "CUDA_VISIBLE_DEVICES='3'" in message and "NGPU to at most 1" in message
    check_visible_gpus(1, 2, visible=2)


def test_init_distributed_checks_before_touching_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", pytest.fail)  # the bare CUDA error's source
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes per node were asked for"):
        init.init_distributed()


class RecordingBatch:
    """Stands in for a host batch to see which copy `host_to_device` makes (no CUDA here)."""

    def __init__(self):
        self.calls = []

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", device, non_blocking))
        return self


def test_cuda_batches_are_pinned_and_copied_without_blocking():
    batch = RecordingBatch()
    host_to_device(batch, CUDA)
    assert batch.calls == ["pin_memory", ("to", CUDA, True)]


def test_cpu_batches_are_left_as_they_are():
    batch = RecordingBatch()
    host_to_device(batch, torch.device("cpu"))
    assert batch.calls == [("to", torch.device("cpu"), False)]
    tokens = torch.arange(6).view(2, 3)
    moved = host_to_device(tokens, torch.device("cpu"))
    assert moved is tokens and not moved.is_pinned()


def test_tf32_follows_the_option_on_cuda_only():
    matmul = torch.backends.cuda.matmul
    original = matmul.fp32_precision  # a computed attribute: monkeypatch cannot restore it
    try:
        assert apply_tf32(True, CUDA).startswith("on") and matmul.fp32_precision == "tf32"
        assert apply_tf32(False, CUDA).startswith("off") and matmul.fp32_precision == "ieee"
        assert "not applicable on cpu" in apply_tf32(True, torch.device("cpu"))
        assert matmul.fp32_precision == "ieee"  # untouched by the CPU call
    finally:
        matmul.fp32_precision = original


def test_tf32_is_a_training_option_on_by_default():
    assert load_config(None, []).training.enable_tf32
    assert not load_config(None, ["--training.enable_tf32=false"]).training.enable_tf32
