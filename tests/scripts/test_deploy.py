"""scripts/deploy.sh: its help, and one-line errors for what it doesn't know."""

import subprocess

import pytest

from tests.conftest import REPO

DEPLOY = str(REPO / "scripts" / "deploy.sh")


def deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DEPLOY, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_help_lists_sizes_and_actions():
    result = deploy("--help")
    assert result.returncode == 0
    for word in ("debug", "799m", "200b", "400b", "plan", "create", "train", "serve", "demo"):
        assert word in result.stdout


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("7b", "train"), "error: unknown size '7b'; sizes: debug, bench, 799m, 200b, 400b"),
        (("debug", "fly"), "error: unknown action 'fly'; actions: plan, create, train, serve"),
        (("debug",), "error: missing ACTION; actions: plan, create"),
        (("bench", "demo"), "error: demo is for the debug size only (got 'bench')"),
        (("debug", "train", "two"), "error: NODES must be a whole number >= 1, got 'two'"),
    ],
)
def test_mistakes_are_one_line_errors(args, error):
    result = deploy(*args)
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if not line.startswith("[setup]")]
    assert line.startswith(error)
