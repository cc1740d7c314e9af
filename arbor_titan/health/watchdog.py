"""A hang watchdog: no progress within `training.hang_timeout_s` → stacks to a file, then exit.

A rank stuck in a collective (a peer died, a network fault) waits forever and holds every GPU of
the job. faulthandler's timer thread runs in C and needs no GIL, so it fires even while Python is
blocked in a C call; it writes every thread's Python stack to this rank's file in the run folder
and ends the process with status 1, which a launcher with restarts left (`MAX_RESTARTS`) turns
into a restart from the newest checkpoint.
"""

import faulthandler
import logging
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from arbor_titan.callbacks import Callback

if TYPE_CHECKING:
    from arbor_titan.trainer import Trainer

logger = logging.getLogger("arbor_titan")


def stacks_file(run_dir: Path, rank: int) -> Path:
    """Where rank `rank` writes its stacks when it hangs."""
    return run_dir / f"hang-stacks-rank{rank}.txt"


class HangWatchdog(Callback):
    """Re-armed at the start and end of every step, so one step together with its callbacks
    (validation, a checkpoint save) must finish within the timeout."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.path: Path | None = None
        self._file: TextIO | None = None

    def start(self, path: Path) -> None:
        """Open this rank's stacks file (removed again by `stop` if nothing hung) and arm."""
        self.path = path
        self._file = path.open("w")
        self._file.write(
            f"no training progress within training.hang_timeout_s={self.timeout_s:g} s; "
            "the Python stack of every thread of this process:\n"
        )
        self._file.flush()
        self.arm()

    def arm(self) -> None:
        """Restart the countdown."""
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=self._file)

    def stop(self) -> None:
        """Disarm and remove the stacks file: the watched code finished."""
        faulthandler.cancel_dump_traceback_later()
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.unlink(missing_ok=True)

    # -- hooks

    def on_train_start(self, trainer: "Trainer") -> None:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        self.start(stacks_file(trainer.run_dir, trainer.proc.rank))
        logger.info("hang watchdog: %g s per step (stacks to %s)", self.timeout_s, self.path)

    def on_step_start(self, trainer: "Trainer") -> None:
        self.arm()

    def on_step_end(self, trainer: "Trainer") -> None:
        self.arm()

    def on_train_end(self, trainer: "Trainer") -> None:
        self.stop()
