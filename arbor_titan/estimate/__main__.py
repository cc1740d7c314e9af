"""`python -m arbor_titan.estimate CONFIG.toml [--section.key=value ...] [planner options]`.

Plans the length of `--seq-len`, else of the `[context]` schedule's longest stage, and, when the
config's context parallel degree is above 1 or the plan does not fit, the smallest degree that fits.
Exits 0 when every simulated rank fits, 1 when one does not, 2 on a config or layout error.
"""

import argparse
import json
import os
import sys

# The plan never touches a GPU; hiding them keeps the fake process group's device mesh on CPU
# even on a training node (set before torch is imported).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from arbor_titan.config.cli import load_config  # noqa: E402
from arbor_titan.config.loader import ConfigError  # noqa: E402
from arbor_titan.estimate import (  # noqa: E402
    EstimateOptions,
    MemoryOptions,
    format_plan,
    plan,
    plan_json,
)
from arbor_titan.estimate.auto_ac import choose_activation_checkpoint  # noqa: E402
from arbor_titan.estimate.context_fit import check_cp_splits, smallest_fitting_cp  # noqa: E402
from arbor_titan.estimate.plan import planned_length, planned_world_size  # noqa: E402
from arbor_titan.estimate.throughput import DEFAULT_GPU  # noqa: E402
from arbor_titan.registry import PluginError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m arbor_titan.estimate",
        description="Plan a training config on one CPU: per-rank shards, memory and step cost. "
        "Any --section.key=value overrides the config as in training.",
    )
    parser.add_argument("config", help="the TOML config to plan")
    parser.add_argument("--json", metavar="OUT.json", help="also write the plan as JSON")
    parser.add_argument(
        "--world-size", type=int, help="ranks to plan for (NGPU × NNODES); default: the degrees"
    )
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="per-GPU capacity")
    parser.add_argument(
        "--reserve-gib", type=float, default=4.0, help="CUDA context, NCCL, fragmentation"
    )
    parser.add_argument("--gpu", default=DEFAULT_GPU, help="GPU whose peak sets the step time")
    parser.add_argument("--peak-tflops", type=float, help="per-GPU peak, instead of --gpu's")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the step time")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="kernels to count for"
    )
    parser.add_argument("--ranks", default="sample", help="sample, all, or e.g. 0,7,511")
    parser.add_argument("--vocab-size", type=int, help="instead of the tokenizer file or flavor")
    parser.add_argument(
        "--seq-len",
        type=int,
        help="plan at this sequence length (training.seq_len); default: the [context] "
        "schedule's longest",
    )
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(planner arguments, config overrides): overrides are the --section.key options."""
    ours, overrides = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "." in name:
            takes_next = "=" not in arg and index + 1 < len(argv)
            takes_next = takes_next and not argv[index + 1].startswith("--")
            overrides += argv[index : index + 1 + takes_next]
            index += 1 + takes_next
        else:
            ours.append(arg)
            index += 1
    return ours, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, overrides = split_overrides(argv)
    args = _parser().parse_args(ours)
    if args.seq_len is not None:
        overrides.append(f"--training.seq_len={args.seq_len}")
    options = EstimateOptions(
        world_size=args.world_size,
        memory=MemoryOptions(args.gpu_memory_gib, args.reserve_gib, args.device),
        gpu=args.gpu,
        peak_tflops=args.peak_tflops,
        assumed_mfu=args.mfu,
        ranks=args.ranks,
        vocab_size=args.vocab_size,
    )
    try:
        length = planned_length(load_config(args.config, overrides), args.seq_len)
        cfg = length.config
        check_cp_splits(cfg.parallelism.context_parallel_degree, length.lengths)
        if cfg.activation_checkpoint.mode == "auto":
            world_size = planned_world_size(cfg.parallelism, options.world_size)[0]
            cfg, reason = choose_activation_checkpoint(cfg, world_size, options.memory)
            print(reason)
        result = plan(cfg, options)
        result.length_source = length.source
        result.cp_fit = smallest_fitting_cp(cfg, options, result, length.lengths)
    except (ConfigError, PluginError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(result, args.config))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(plan_json(result, args.config), out, indent=1)
    return 0 if result.fits and result.params_add_up else 1


if __name__ == "__main__":
    sys.exit(main())
