"""The decode step's matrix products, routed to the CPU kernel that reaches memory bandwidth.

Decoding one token per sequence multiplies a few rows by every weight matrix, so a step is bound
by reading the weights. For fp32 on CPU, `F.linear` goes to MKL's gemv, which runs these shapes
on one thread: 16 GB/s on this 2-core machine against 31 GB/s for a plain read. oneDNN's
matmul (the kernel inductor itself uses for frozen CPU linears) splits the rows across threads
and reads at 27-33 GB/s, with no copy or repacking of the weights. It costs ~8 µs more per call,
so matrices under `ONEDNN_MIN_BYTES` stay with `F.linear`. bf16 linears already go through
oneDNN, and GPUs keep cuBLAS. Measured with `python scripts/bench_inference.py`.

The oneDNN call is wrapped as a custom op for `torch.compile`: inductor's own lowering of it
expects weights packed by its freezing pass, while an opaque op is called as it is.
"""

import torch
import torch.nn.functional as F

# Weights are read from memory, not cache, in a decode step (each is used once per step). From
# there oneDNN wins above ~200 KB (measured on 128 MB of distinct fp32 matrices: 128×128 11 µs
# with F.linear and 19 µs with oneDNN; 256×256 33 and 28 µs; 384×384 64 and 41 µs).
ONEDNN_MIN_BYTES = 2**18
_HAS_ONEDNN = torch.backends.mkldnn.is_available()  # read once: dynamo won't trace the call


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` for the decode step, through oneDNN where that is faster."""
    if not _onednn_is_faster(x, weight):
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        return onednn_linear(x, weight)
    return _onednn_linear(x, weight)


def _onednn_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.nbytes >= ONEDNN_MIN_BYTES
        and _HAS_ONEDNN
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("arbor_inference::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`_onednn_linear` as an op `torch.compile` leaves alone."""
    return _onednn_linear(x, weight)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
