"""scripts/bench_growth.py: arms that differ only in their growth, FLOPs counted over both phases
of a grown run, the equal-FLOPs baseline, lr selection and paired statistics, and a --quick run
end to end (trained, summarized and plotted)."""

import importlib.util
import json

import pytest

from tests.conftest import REPO, import_or_skip

spec = importlib.util.spec_from_file_location("bench_growth", REPO / "scripts/bench_growth.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SECTIONS = ("training", "optimizer", "lr_scheduler", "data", "tokenizer", "validation")


def configs(argv: list[str], lr: float = 2e-3, seed: int = 1) -> dict:
    args = bench.parse_args(argv)
    grow_at = bench.grow_step(args.grow_at[0], args.steps)
    return {
        arm: bench.config_of(
            bench.Run(arm, lr, seed, args.steps, grow_at if arm in bench.GROWN else 0), args
        )
        for arm in (*bench.TUNED, "rewarm")
    }


def test_arms_differ_only_in_model_and_growth():
    arms = configs([])
    scratch = arms["scratch"]
    assert scratch.training.steps == 160 and scratch.optimizer.lr == 2e-3
    assert scratch.training.seed == 1 and scratch.lr_scheduler.warmup_steps == 16
    for arm, cfg in arms.items():
        for section in SECTIONS:
            assert getattr(cfg, section) == getattr(scratch, section), (arm, section)
    large = bench.growth_plan(scratch)[-1][1]
    for arm in bench.GROWN:
        growth = arms[arm].growth
        assert [s.at_step for s in growth.stages] == [53, 54] and growth.seed == 1
        assert (
            bench.growth_plan(arms[arm])[-1][1] == large
        )  # every grown arm ends in scratch's shape
    assert [s.op for s in arms["stack"].growth.stages] == ["clone_width", "stack"]
    assert [s.op for s in arms["exact"].growth.stages] == ["clone_width", "deepen"]
    assert arms["random"].growth.init == "random" and arms["exact"].growth.init == "operator"
    assert arms["rewarm"].growth.rewarmup_steps == 8 and arms["exact"].growth.rewarmup_steps == 0
    assert not arms["small"].growth.enable and arms["small"].model.flavor == "debug"


def test_grown_run_counts_the_small_phase_then_the_large_one():
    arms = configs(["--quick", "--steps=6", "--grow-at=0.34"])
    assert [s.at_step for s in arms["exact"].growth.stages] == [2, 3]
    big, small = bench.cumulative_flops(arms["scratch"]), bench.cumulative_flops(arms["exact"])
    step_flops = [b - a for a, b in zip(small, small[1:])]
    # Steps 1-2 train debug, step 3 the cloned width at 4 layers, steps 4-6 the large shape.
    assert step_flops[0] == step_flops[1] < step_flops[2] < step_flops[3]
    assert step_flops[3:] == [big[1]] * 3
    assert big[-1] == 6 * big[1]


def test_matched_scratch_costs_what_a_grown_arm_costs():
    args = bench.parse_args([])
    steps = bench.matched_steps(args, 2e-3, 1)
    grown = bench.cumulative_flops(configs([])["exact"])[-1]
    matched = bench.config_of(bench.Run("matched", 2e-3, 1, steps), args)
    per_step = bench.cumulative_flops(matched)[1]
    assert matched.model.flavor == "growth_large" and steps < args.steps
    assert abs(bench.cumulative_flops(matched)[-1] - grown) <= per_step / 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grow-at=0.995"], "--grow-at 0.995"),
        (["--arms", "scratch", "stack"], "--arms must include scratch and exact"),
        (["--jobs=0"], "--jobs must be at least 1"),
    ],
)
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def result(arm: str, lr: float, losses: list[float], flops_per_step: float = 1.0, seed: int = 1):
    """A fake finished run evaluated every step."""
    run = bench.Run(arm, lr, seed, len(losses))
    cum = [flops_per_step * step for step in range(len(losses) + 1)]
    return bench.Result(run, cum, list(enumerate(losses, start=1)), [], None)


def test_each_arm_takes_its_best_rate_and_borrowed_arms_take_their_sources():
    grid = [
        result("scratch", 1e-3, [6.0, 5.0]),
        result("scratch", 2e-3, [6.0, 4.8]),
        result("exact", 1e-3, [6.0, 4.7]),
        result("exact", 2e-3, [6.0, 4.9]),
    ]
    best = bench.best_lrs({r.run: r for r in grid})
    assert best == {"scratch": 2e-3, "exact": 1e-3, "rewarm": 1e-3, "matched": 2e-3}


def test_speedup_is_paired_and_interpolated():
    scratch = result("scratch", 1e-3, [6.0, 5.0, 4.0, 3.0])  # reaches its final 3.0 at 4 FLOPs
    grown = result("exact", 1e-3, [5.0, 3.5, 2.5], flops_per_step=0.5)  # 3.0 between 1 and 1.5
    pair = bench.paired(scratch, grown)
    assert pair["target"] == 3.0
    assert pair["flops_to_target"] == pytest.approx(1.25)
    assert pair["speedup"] == pytest.approx(4 / 1.25)
    assert bench.paired(scratch, result("small", 1e-3, [5.0, 4.0]))["speedup"] is None


def test_spread_gives_a_t_interval_over_seeds():
    s = bench.spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == 1.0 and (s["min"], s["max"]) == (1.0, 3.0)
    half = 4.303 / 3**0.5  # t(0.975, 2 degrees of freedom) · sd / sqrt(n)
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half])


@pytest.mark.slow
def test_quick_run_writes_summary_and_plot(dump_folder, capsys):
    import_or_skip("matplotlib")
    # The session's dump folder: its small corpus and tokenizer are the --quick ones.
    assert bench.main(["--quick", f"--dump-folder={dump_folder}"]) == 0
    summary = json.loads((dump_folder / "bench_growth.json").read_text())
    arms = summary["arms"]
    assert set(arms) == {"scratch", "exact", "matched"} and summary["steps"] == 4
    assert arms["exact"]["grow_at"] == 1 and len(arms["exact"]["per_seed_final"]) == 1
    assert arms["exact"]["total_flops"] < arms["scratch"]["total_flops"]
    assert arms["matched"]["steps"] < 4
    # Exact growth keeps the held-out loss across both stages (float32 rounding aside).
    assert abs(arms["exact"]["growth_jumps"]["mean"]) < 1e-3
    assert set(summary["lr_grid"]["scratch"]) == {"0.003"}
    assert (dump_folder / "bench_growth.png").read_bytes()[:4] == b"\x89PNG"
    assert "speedup" in capsys.readouterr().out
