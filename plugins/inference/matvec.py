"""The decode step's matrix products, routed to the CPU kernels that reach memory bandwidth.

Decoding one token per sequence multiplies a few rows by every weight matrix, so a step is bound
by reading the weights. Measured on this 2-core machine (31-34 GB/s for a plain read):

- fp32: `F.linear` goes to MKL's gemv, which runs these shapes on one thread (16 GB/s).
  oneDNN's matmul (the kernel inductor uses for frozen CPU linears) splits the rows across
  threads and reads the same weights, unchanged, at 27-33 GB/s.
- bf16/fp16: `F.linear` already calls oneDNN, but on row-major weights it reads at ~18 GB/s;
  weights reordered once into oneDNN's blocked layout read at ~25 GB/s. That costs a second
  copy of the weights (the model's row-major ones still serve prefill), so it can be turned off.

oneDNN costs ~8 µs more per call, so matrices under `ONEDNN_MIN_BYTES` stay with `F.linear`;
GPUs keep cuBLAS. The oneDNN calls are custom ops under `torch.compile`: inductor's own lowering
of them expects weights packed by its freezing pass, while an opaque op is called as it is.

A compiled decode step of a single row (batch 1) is the exception: there the product is written
as `(weight * x).sum(-1)`, which inductor fuses into one vectorized reduction reading each weight
once. On one thread of this machine that reads at 27-29 GB/s where oneDNN reads at 12 (fp32)
and the packed bf16 copy at 15.5 (measured on the `bench` model's 25 decode matrices). More
rows would read the weight once per row, so they keep oneDNN.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Weights are read from memory, not cache, in a decode step (each is used once per step). From
# there oneDNN wins above ~200 KB (measured on 128 MB of distinct fp32 matrices: 128×128 11 µs
# with F.linear and 19 µs with oneDNN; 256×256 33 and 28 µs; 384×384 64 and 41 µs).
ONEDNN_MIN_BYTES = 2**18
_HAS_ONEDNN = torch.backends.mkldnn.is_available()  # read once: dynamo won't trace the call
_HALF = (torch.bfloat16, torch.float16)


class DecodeMatrix(nn.Module):
    """A weight as the cached forward multiplies it: by `F.linear` for prefill (many rows), by
    the fastest kernel measured for decode (a few rows)."""

    def __init__(self, weight: torch.Tensor, pack: bool = True):
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=False)
        packed = _pack(self.weight) if pack and _onednn_serves(self.weight, _HALF) else None
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor, decoding: bool) -> torch.Tensor:
        if not decoding:
            return F.linear(x, self.weight)
        if _fused_reduction_serves(x, self.weight):
            return _row_times_matrix(x, self.weight)
        if self.packed is not None:
            return _call(x, self.packed, self.weight.shape[0])
        return decode_linear(x, self.weight)


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` for the decode step, through oneDNN where that is faster."""
    if not _onednn_is_faster(x, weight):
        return F.linear(x, weight)
    return _call(x, weight, weight.shape[0])


def _fused_reduction_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A single row on CPU while compiling: inductor's fused reduction beats any library call."""
    return (
        torch.compiler.is_compiling()
        and x.numel() == x.shape[-1]
        and x.dtype == weight.dtype
        and weight.device.type == "cpu"
    )


def _row_times_matrix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear` of one row as the product-and-sum inductor turns into a single reduction."""
    return (weight * x.reshape(1, -1)).sum(-1).view(*x.shape[:-1], weight.shape[0])


def _onednn_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype and _onednn_serves(weight, (torch.float32,))


def _onednn_serves(weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """A CPU weight of one of `dtypes`, big enough for oneDNN's call overhead to pay."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in dtypes
        and weight.nbytes >= ONEDNN_MIN_BYTES
        and _HAS_ONEDNN
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout for any number of rows (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _call(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """oneDNN's linear on x's rows, for a row-major or a packed weight: called directly in
    eager (the custom op's dispatch costs a few µs a call), as the custom op when compiling."""
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        out = onednn_linear(rows, weight, out_features)
    else:
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")
    return out.view(*x.shape[:-1], out_features)


@torch.library.custom_op("arbor_inference::onednn_linear", mutates_args=())
def onednn_linear(rows: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """oneDNN's linear as an op `torch.compile` leaves alone (`out_features` because a packed
    weight is opaque to fake tensors)."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")


@onednn_linear.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], out_features)
