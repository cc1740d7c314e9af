"""scripts/bench_long_context.py --quick: every (mode, length) point is measured in its own
process and written, and a step's peak grows with the sequence length."""

import importlib.util
import json

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location(
    "bench_long_context", REPO / "scripts/bench_long_context.py"
)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def test_quick_run_writes_every_point(tmp_path, capsys):
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "bench_long_context.json").read_text())
    peaks = summary["peak_bytes"]
    assert sorted(peaks) == sorted(script.QUICK_MODES)
    short, long = (str(n) for n in script.QUICK_LENGTHS)
    for mode, by_length in peaks.items():
        assert sorted(by_length) == sorted([short, long]), mode
        # Twice the tokens hold clearly more activations (a flat reading means a broken probe).
        assert by_length[long] > 1.5 * by_length[short] > 0, (mode, by_length)
    assert "| 256 |" in capsys.readouterr().out
