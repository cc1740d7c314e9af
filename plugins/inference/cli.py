"""Command-line options shared by `scripts/generate.py`, `scripts/serve.py` and the benchmark:
which weights to load, in which dtype, on which device, with which RoPE scaling."""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from arbor_titan import registry
from arbor_titan.config.loader import parse_cli_value
from plugins.inference.loading import DTYPES, LoadedModel, load_model, newest_checkpoint
from plugins.inference.rope import RopeOverride

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
        default="static_kv",
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
