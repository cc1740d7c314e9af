"""scripts/bench_growth.py: FLOPs counted over both phases of a grown run, interpolation to a
target loss, and a --quick run end to end (both arms trained, summary and plot written)."""

import importlib.util
import json

import pytest

from arbor_titan.config.cli import load_config
from tests.conftest import REPO, import_or_skip

spec = importlib.util.spec_from_file_location("bench_growth", REPO / "scripts/bench_growth.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_grown_run_counts_the_small_phase_then_the_large_one():
    args = bench.parse_args(["--quick", "--steps=6", "--grow-at=2"])
    overrides = bench.common_overrides(args)
    scratch = load_config(bench.CONFIGS["scratch"], overrides)
    grown = load_config(
        bench.CONFIGS["grown"], overrides + [bench.stages_override(bench.CONFIGS["grown"], 2)]
    )
    assert [s.at_step for s in grown.growth.stages] == [2, 3]
    big, small = bench.cumulative_flops(scratch), bench.cumulative_flops(grown)
    step_flops = [b - a for a, b in zip(small, small[1:])]
    # Steps 1-2 train debug, step 3 the cloned width at 4 layers, steps 4-6 the large shape.
    assert step_flops[0] == step_flops[1] < step_flops[2] < step_flops[3]
    assert step_flops[3:] == [big[1]] * 3
    assert big[-1] == 6 * big[1]


@pytest.mark.slow
def test_quick_run_writes_summary_and_plot(dump_folder, capsys):
    import_or_skip("matplotlib")
    # The session's dump folder: its small corpus and tokenizer are the --quick ones.
    assert bench.main(["--quick", f"--dump-folder={dump_folder}"]) == 0
    summary = json.loads((dump_folder / "bench_growth.json").read_text())
    assert summary["grow_at"] == [1, 2] and summary["steps"] == 4
    assert summary["grown_total_flops"] < summary["scratch_total_flops"]
    assert summary["scratch_flops_to_target"] <= summary["scratch_total_flops"]
    assert (dump_folder / "bench_growth.png").stat().st_size > 0
    assert "speedup: " in capsys.readouterr().out
