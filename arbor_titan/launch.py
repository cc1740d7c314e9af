"""`torchrun` whose last word is the training's own error (what `./run_train.sh` runs).

A rank that stops on a user's mistake (a config key, a value, a path, a layout) has one clear
line to say, `error: ...`. Printed by the rank under torchrun, that line would sit above
torchrun's `ChildFailedError` report, once per rank. Launched from here, a rank writes it to the
file named by `ARBOR_ERROR_FILE` instead, only the first rank to fail; the launcher then prints
it last, once, and exits with the training's status for user errors. Anything else (a crash with
a traceback) gets torchrun's full report as before.
"""

import os
import sys
import tempfile
from pathlib import Path

ERROR_FILE_ENV = "ARBOR_ERROR_FILE"
USER_ERROR_STATUS = 2


def report_user_error(message: str) -> int:
    """Show a user's mistake as one line (to stderr, or to the launcher's error file, first rank
    only); returns the exit status for it."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        print(message, file=sys.stderr)
        return USER_ERROR_STATUS
    try:
        with open(path, "x") as f:  # exclusive: a later rank's message is not the first
            f.write(message + "\n")
    except FileExistsError:
        pass
    return USER_ERROR_STATUS


def main(argv: list[str] | None = None) -> int:
    """`python -m arbor_titan.launch [torchrun options] -m arbor_titan.train ...`"""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    with tempfile.TemporaryDirectory(prefix="arbor_launch_") as folder:
        error_file = Path(folder) / "error"
        os.environ[ERROR_FILE_ENV] = str(error_file)  # the ranks inherit it
        # A restart (--max-restarts) must not meet the last attempt's process-group keys: with
        # the agent's shared store (torch's default) the new ranks can read a dead rank's gloo
        # address and fail to connect. Opting out gives each rendezvous round a store of its own.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        try:
            run(parse_args(sys.argv[1:] if argv is None else argv))
        except ChildFailedError:
            if not error_file.is_file():
                raise
            print(error_file.read_text().rstrip("\n"), file=sys.stderr)
            return USER_ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
