"""Grow a DCP checkpoint offline: weights and optimizer state, one tensor at a time.

    python scripts/grow_checkpoint.py SRC_STEP_FOLDER OUT_FOLDER --op deepen --param layers=[1,3]

`--param key=value` repeats; values are TOML (`3`, `true`, `[1, 3]`, `"split"`). The output
folder gets the grown tensors, a `model_args.json` with the grown shape, and the source's
`config.toml` and `tokenizer.model`.
"""

import argparse
import sys
import warnings
from pathlib import Path

from arbor_titan.config.loader import ConfigError, parse_cli_value
from arbor_titan.growth import Growth
from arbor_titan.growth.checkpoint import grow_checkpoint


def parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected key=value")
    return key, parse_cli_value(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="checkpoint folder to grow (e.g. .../step-2000)")
    parser.add_argument("out", type=Path, help="new folder for the grown checkpoint")
    parser.add_argument("--op", required=True, help="growth_operator name (e.g. deepen)")
    parser.add_argument(
        "--param", type=parse_param, action="append", default=[], help="operator param key=value"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the new random entries")
    args = parser.parse_args(argv)
    params = dict(args.param)
    # DCP warns that no process group exists; a single process is exactly the intent here.
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    try:
        grow_checkpoint(
            args.src,
            args.out,
            lambda model_args: Growth.create(
                args.op, model_args, params, seed=args.seed, where="grow_checkpoint"
            ),
        )
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
