"""Command-line options shared by `scripts/generate.py`, `scripts/serve.py` and the benchmark:
which weights to load, in which dtype, on which device, with which RoPE scaling."""

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from arbor_titan import registry
from arbor_titan.config.loader import parse_cli_value
from arbor_titan.models.arbor.args import ArborArgs
from plugins.inference.kv_cache import BLOCK_SIZE
from plugins.inference.loading import DTYPES, LoadedModel, load_model, newest_checkpoint
from plugins.inference.rope import RopeOverride, context_length

# Where the README's first training command (./run_train.sh, the debug model) saves.
DEFAULT_CHECKPOINTS = Path("outputs/debug/checkpoints")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a DCP step-N folder, a consolidated .pt file or a Hugging Face folder "
        f"(default: the newest checkpoint in {DEFAULT_CHECKPOINTS})",
    )
    parser.add_argument(
        "--model-args", type=Path, help="model_args.json (or its folder) for a .pt file"
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model, if not beside the weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--engine",
        default="paged_kv",
        help="inference_engine plugin to generate with (registered engines: "
        "arbor_titan.registry.names('inference_engine'))",
    )
    parser.add_argument(
        "--rope-scaling",
        metavar="NAME",
        help="run with this rope_scaling plugin instead of the checkpoint's (linear, ntk, "
        "dynamic_ntk, yarn, llama3, or none for plain RoPE); the model's length becomes its "
        "original length × factor",
    )
    parser.add_argument(
        "--rope-factor",
        type=float,
        metavar="F",
        help="the scaling's factor (same as --rope-param factor=F)",
    )
    parser.add_argument(
        "--rope-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another param of the scaling, e.g. original_max_seq_len=4096 or beta_fast=16 "
        "(repeatable; original_max_seq_len defaults to the checkpoint's training length)",
    )


def engine_factory(name: str) -> Callable[..., Any]:
    """The `inference_engine` plugin `name`: called as factory(model, tokenizer, slots, max_len,
    compile)."""
    return registry.get("inference_engine", name)


def load_from_args(args: argparse.Namespace, mesh: DeviceMesh | None = None) -> LoadedModel:
    """The model named by `add_model_arguments`' options (this process's shard, with a mesh)."""
    checkpoint = args.checkpoint or newest_checkpoint(DEFAULT_CHECKPOINTS)
    device = torch.device(args.device)
    if mesh is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun's local rank
    return load_model(
        checkpoint,
        DTYPES[args.dtype],
        device,
        args.model_args,
        args.tokenizer,
        mesh,
        rope_override(args),
    )


def rope_override(args: argparse.Namespace) -> RopeOverride | None:
    """The change of RoPE scaling `--rope-scaling/--rope-factor/--rope-param` ask for; None keeps
    the checkpoint's. Values read as TOML values (4, 0.5, true)."""
    params = {}
    for item in args.rope_param:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--rope-param: expected KEY=VALUE, got {item!r}")
        params[key.strip()] = parse_cli_value(text.strip())
    if args.rope_factor is not None:
        if "factor" in params:
            raise ValueError("--rope-factor and --rope-param factor=... both set the factor")
        params["factor"] = args.rope_factor
    if args.rope_scaling is None and not params:
        return None
    return RopeOverride(args.rope_scaling, params)


def check_sizes(
    args: ArborArgs,
    dtype: torch.dtype,
    device: torch.device,
    sequences: tuple[str, int],
    length: tuple[str, int],
    past_context_ok: bool = False,
    kv_cache_gib: float | None = None,
) -> None:
    """ValueError naming the flag when the engine these sizes ask for can't run: fewer than one
    sequence or position, a length past the model's context (unless `past_context_ok`), a KV
    cache (`--kv-cache-gib`, by default room for every sequence's whole length) that can't hold
    one sequence of that length or is larger than the memory free on `device`. `sequences` and
    `length` are (flag, value)."""
    for flag, value in (sequences, length):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    context = context_length(args)
    if length[1] > context and not past_context_ok:
        raise ValueError(
            f"{length[0]} {length[1]} is past the model's context of {context} tokens (its "
            "training length, or what its RoPE scaling reaches: --rope-scaling NAME "
            "--rope-factor F extends it)"
        )
    per_block = 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize * BLOCK_SIZE
    sequence = math.ceil(length[1] / BLOCK_SIZE) * per_block
    if kv_cache_gib is None:
        needed, what = sequence * sequences[1], f"{sequences[0]} {sequences[1]} × {length[0]}"
    else:
        needed, what = int(kv_cache_gib * 2**30), "--kv-cache-gib"
        if needed < sequence:
            raise ValueError(
                f"--kv-cache-gib {kv_cache_gib} holds {needed // per_block * BLOCK_SIZE} "
                f"positions, less than one sequence of {length[0]} {length[1]}"
            )
    free = free_memory(device)
    if needed > free:
        raise ValueError(
            f"the KV cache for {what} {length[1]} needs {needed / 2**30:.1f} GiB but "
            f"{free / 2**30:.1f} GiB is free on {device}: lower it"
        )


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (on CPU: the physical memory free now)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
