#!/usr/bin/env python
"""Convert model weights between arbor_titan DCP checkpoints, one torch file and Hugging Face.

  python scripts/convert_checkpoint.py dcp-to-hf outputs/run/checkpoints/step-1000 my-model-hf
  python scripts/convert_checkpoint.py hf-to-dcp my-model-hf imported/step-0
  python scripts/convert_checkpoint.py dcp-to-torch outputs/run/checkpoints/step-1000 model.pt
  python scripts/convert_checkpoint.py torch-to-dcp model.pt out/step-0 --like SRC_DCP_FOLDER

Only model weights are converted (never optimizer or data state). One progress line is printed
per tensor; a bad input ends with a one-line error naming it and exit status 1.
"""

import argparse
import sys
from pathlib import Path

import torch

from arbor_titan.checkpoint.convert import ConversionError, dcp_to_torch, torch_to_dcp
from arbor_titan.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES, dcp_to_hf, hf_to_dcp

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _emit(line: str) -> None:
    print(line, flush=True)


def _dcp_to_torch(a: argparse.Namespace) -> None:
    dcp_to_torch(a.src, a.out, emit=_emit)


def _torch_to_dcp(a: argparse.Namespace) -> None:
    torch_to_dcp(a.src, a.out, like=a.like, model_args=a.model_args, emit=_emit)


def _dcp_to_hf(a: argparse.Namespace) -> None:
    dtype = DTYPES[a.dtype] if a.dtype else None
    dcp_to_hf(a.src, a.out, dtype=dtype, max_shard_bytes=int(a.max_shard_gb * 1e9), emit=_emit)


def _hf_to_dcp(a: argparse.Namespace) -> None:
    hf_to_dcp(a.src, a.out, emit=_emit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help: str, src: str, out: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("src", type=Path, metavar=src)
        sub.add_argument("out", type=Path, metavar=out, help="must not exist yet")
        sub.set_defaults(run=run)
        return sub

    command(
        "dcp-to-torch",
        _dcp_to_torch,
        "Model weights of a DCP checkpoint as one file for torch.load(weights_only=True).",
        "SRC_DCP_FOLDER",
        "OUT.pt",
    )
    sub = command(
        "torch-to-dcp",
        _torch_to_dcp,
        "A consolidated weights file back into a DCP checkpoint folder.",
        "IN.pt",
        "OUT_DCP_FOLDER",
    )
    shape = sub.add_mutually_exclusive_group(required=True)
    shape.add_argument(
        "--like",
        type=Path,
        metavar="SRC_DCP_FOLDER",
        help="copy model_args.json, config.toml and tokenizer.model from this checkpoint",
    )
    shape.add_argument(
        "--model-args", type=Path, metavar="FILE", help="the model_args.json to write alongside"
    )
    sub = command(
        "dcp-to-hf",
        _dcp_to_hf,
        "A DCP checkpoint as a Hugging Face Llama folder (config.json + model.safetensors).",
        "SRC_DCP_FOLDER",
        "OUT_HF_FOLDER",
    )
    sub.add_argument(
        "--dtype", choices=list(DTYPES), help="cast the weights (default: keep them exact)"
    )
    sub.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_MAX_SHARD_BYTES / 1e9,
        help="split model.safetensors into shards of at most this size (default: %(default)g)",
    )
    command(
        "hf-to-dcp",
        _hf_to_dcp,
        "A Hugging Face Llama folder (safetensors) as a DCP checkpoint folder.",
        "SRC_HF_FOLDER",
        "OUT_DCP_FOLDER",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ConversionError as err:
        print(f"convert_checkpoint {args.command}: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
