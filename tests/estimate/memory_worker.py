"""Measure what one real training step allocates, for comparison with the planner's estimate.

Run alone (one rank) or under torchrun: `memory_worker.py OUT_DIR CASE [CASE ...]` where a CASE
is `name:--section.key=value,...`. Each rank writes OUT_DIR/rank<r>.json with, per case:

- params, grads, optimizer: bytes of this rank's local shards of the parameters, of their
  gradients after backward, and of AdamW's state after a step - summed exactly.
- held: activations kept for backward at the end of the forward, when they peak. Method: a
  TorchDispatchMode records a weak reference to the storage of every tensor an op creates during
  the forward; at its end the storages still alive (and not parameters - FSDP2's gathered
  weights are the modules' parameters then) are what autograd, the checkpoint wrappers and the
  selective-checkpoint cache keep. Each storage counts once, at its current size; storages are
  keyed by their C++ object, not their address, which FSDP2's in-place resizing changes.
- peak (one rank only): the highest live total of such storages over forward and backward,
  gradients excluded. Under FSDP2 storages are resized in place, so peaks are not tracked there.
"""

import contextlib
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from arbor_titan.config.cli import load_config
from arbor_titan.distributed.build import build_model
from arbor_titan.distributed.context_parallel import ContextParallel
from arbor_titan.distributed.init import init_distributed, shutdown
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.models.arbor import resolve_args
from arbor_titan.optim import build_optimizer
from arbor_titan.trainer import cross_entropy_loss

VOCAB = 8000  # the bench flavor's
BASE = ["--model.flavor=bench", "--training.seq_len=256", "--training.local_batch_size=2"]


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def storage_keys(tensors) -> set[int]:
    return {local(t).untyped_storage()._cdata for t in tensors if t is not None}


class LiveStorages(TorchDispatchMode):
    """Weak references to every storage created by an op while active; optionally the peak of
    their live bytes outside `exclude()`."""

    def __init__(self, exclude, track_peak: bool):
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}
        self.exclude, self.track_peak, self.peak = exclude, track_peak, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = local(tensor).untyped_storage()
                ref = self.refs.get(storage._cdata)
                if ref is None or ref() is None:  # a freed storage's memory can be reused
                    self.refs[storage._cdata] = weakref.ref(storage)
        if self.track_peak:
            self.peak = max(self.peak, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        excluded, total = self.exclude(), 0
        for key, ref in list(self.refs.items()):
            storage = ref()
            if storage is None:
                del self.refs[key]
            elif key not in excluded:
                total += storage.nbytes()
        return total


def measure(overrides: list[str], world_size: int, device: torch.device) -> dict:
    cfg = load_config(None, BASE + overrides)
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    args = resolve_args(cfg.model, VOCAB, cfg.training.seq_len)
    torch.manual_seed(0)
    model = build_model(cfg, dims, args, cross_entropy_loss, device).model
    optimizer = build_optimizer(model, cfg.optimizer)
    tokens = torch.randint(0, VOCAB, (cfg.training.local_batch_size, cfg.training.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    context_parallel = ContextParallel.from_dims(dims)
    if context_parallel is not None:  # this rank's chunks, as the trainer feeds them
        inputs, labels = context_parallel.shard(inputs), context_parallel.shard(labels)
    params = list(model.parameters())

    def exclude() -> set[int]:
        return storage_keys(model.parameters()) | storage_keys(p.grad for p in params)

    autocast = cfg.training.mixed_precision_param != "float32" and not dims.fsdp_enabled
    precision = (
        torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    )
    probe = LiveStorages(exclude, track_peak=world_size == 1)
    with precision, probe:
        loss = cross_entropy_loss(model(inputs), labels)
        held = probe.live_bytes()
        loss.backward()
    del loss
    grads = sum(local(p.grad).nbytes for p in params)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "params": sum(local(p).nbytes for p in params),
        "grads": grads,
        "optimizer": sum(local(t).nbytes for t in state),
        "held": held,
        "peak": probe.peak if world_size == 1 else None,
    }


def main(out_dir: str, cases: list[str]) -> None:
    proc = init_distributed()
    results = {}
    for case in cases:
        name, _, overrides = case.partition(":")
        results[name] = measure(
            overrides.split(",") if overrides else [], proc.world_size, proc.device
        )
    Path(out_dir, f"rank{proc.rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
