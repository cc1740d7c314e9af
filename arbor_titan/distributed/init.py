"""Start-up of the process group that torchrun describes through its environment variables."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from arbor_titan.distributed.device import check_visible_gpus


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> ProcessInfo:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); a plain process is world 1."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        check_visible_gpus(local_rank, local_world_size, torch.cuda.device_count())
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    return ProcessInfo(rank, local_rank, world_size, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
