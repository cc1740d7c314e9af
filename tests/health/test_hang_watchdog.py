"""A process that makes no progress within the timeout writes its stacks and exits non-zero.
(That the stacks file goes away after a run without a hang: tests/health/test_restart.py.)"""

import subprocess
import sys
import textwrap

from tests.conftest import REPO

HANGING = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from arbor_titan.health import HangWatchdog

    def stuck_in_a_collective():
        time.sleep(60)

    watchdog = HangWatchdog(timeout_s=float(sys.argv[2]))
    watchdog.start(Path(sys.argv[1]))
    watchdog.arm()  # progress: the countdown starts again
    stuck_in_a_collective()
    """
)


def test_a_hang_dumps_every_stack_and_exits_non_zero(tmp_path):
    stacks = tmp_path / "hang-stacks-rank0.txt"
    command = [sys.executable, "-c", HANGING, str(stacks), "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    stacks = (tmp_path / "hang-stacks-rank0.txt").read_text()
    assert "training.hang_timeout_s=1 s" in stacks
    assert "stuck_in_a_collective" in stacks
