"""What a process does with its accelerator beyond placing tensors: which GPU it may use, how
host batches reach it, when its queued work has finished, and its fp32 matmul precision."""

import os

import torch


def check_visible_gpus(local_rank: int, local_world_size: int, visible: int) -> None:
    """Refuse a node asked for more processes than it has GPUs, on every rank of it at once
    (CUDA's own error would be a bare 'invalid device ordinal' from the ranks past the last)."""
    if max(local_rank + 1, local_world_size) <= visible:
        return
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={mask!r})" if mask is not None else ""
    raise ValueError(
        f"{local_world_size} processes per node were asked for (NGPU, or torchrun's "
        f"--nproc_per_node) but this node has {visible} visible GPU(s){shown}; "
        f"set NGPU to at most {visible}"
    )


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to `device`. On CUDA through pinned memory without blocking: a copy
    from pageable memory makes the host wait for every kernel already queued, so it could not
    prepare the next step while the GPU works on this one."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait until the kernels queued on `device` have run (a no-op on CPU, which runs them as
    they are called), so that a clock read next counts them."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def apply_tf32(enabled: bool, device: torch.device) -> str:
    """Run CUDA fp32 matmuls on TF32 tensor cores (10-bit mantissa, ~7x the fp32 rate on
    Hopper) or in full IEEE fp32; returns what was applied, for the log."""
    if device.type != "cuda":
        return f"not applicable on {device.type} (training.enable_tf32 concerns CUDA matmuls)"
    torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
    return "on (fp32 matmuls run as TF32)" if enabled else "off (fp32 matmuls run in IEEE fp32)"
