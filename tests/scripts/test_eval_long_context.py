"""scripts/eval_long_context.py on a debug checkpoint: every length × scaling cell is written,
its loss is the model's own (a direct forward agrees), scalings take effect past the trained
length (and are the identity at it), and bad input stops with the choices."""

import importlib.util
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arbor_titan import registry
from plugins.inference.loading import load_model
from tests.conftest import REPO, run_training

spec = importlib.util.spec_from_file_location(
    "eval_long_context", REPO / "scripts/eval_long_context.py"
)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

SCALINGS = ["none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3"]
TEXT_FILE = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"


@pytest.fixture(scope="module")
def checkpoint(dump_folder) -> Path:
    """The debug model trained 2 steps at seq 64 (so its trained length is 64)."""
    run_training(dump_folder, "eval_long_context", "--training.steps=2")
    return dump_folder / "eval_long_context" / "checkpoints" / "step-2"


def direct_position_losses(checkpoint: Path, length: int, windows: int) -> torch.Tensor:
    """Per-position loss of plain forwards on the script's windows: consecutive slices of
    length + 1 tokens of `[BOS] text [EOS]`."""
    loaded = load_model(checkpoint)
    tokenizer = loaded.tokenizer
    stream = [tokenizer.bos_id, *tokenizer.encode(TEXT_FILE.read_text()), tokenizer.eos_id]
    losses = []
    with torch.no_grad():
        for index in range(windows):
            window = torch.tensor(stream[index * (length + 1) : (index + 1) * (length + 1)])
            logits = loaded.model(window[None, :-1])[0]
            losses.append(F.cross_entropy(logits, window[1:], reduction="none"))
    return torch.stack(losses).mean(0)


@pytest.mark.slow
def test_every_cell_is_written_and_the_loss_is_the_models_own(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(checkpoint), "--text-file", str(TEXT_FILE), "--out", str(out)]
    argv += ["--multiples", "1", "2", "--scalings", *SCALINGS, "--windows", "2", "--buckets", "4"]
    argv += ["--depths", "0", "1", "--trials", "2"]
    assert script.main(argv) == 0
    summary = json.loads((out / "eval_long_context.json").read_text())
    assert summary["trained_length"] == 64 and summary["depths"] == [0.0, 1.0]
    cells = {(r["multiple"], r["scaling"]): r for r in summary["results"]}
    assert sorted(cells) == sorted((m, s) for m in (1, 2) for s in SCALINGS)
    for (multiple, scaling), r in cells.items():
        assert r["length"] == 64 * multiple and r["windows"] == 2
        assert math.isfinite(r["loss"]) and len(r["bucket_loss"]) == 4
        assert all(math.isfinite(v) for v in r["bucket_loss"])
        assert r["bucket_start"] == [0, 16 * multiple, 32 * multiple, 48 * multiple]
        assert set(r["passkey"]) == {"0.0", "1.0"}
        accuracies = [a for a in r["passkey"].values() if a is not None]
        assert all(0.0 <= a <= 1.0 for a in accuracies)
        if multiple == 2:  # 128 tokens hold the needle and question with this tokenizer
            assert len(accuracies) == 2 and r["passkey_accuracy"] is not None
        expected = None if scaling == "none" else scaling
        assert (r["rope_scaling"] or {}).get("type") == expected
    # The number can be trusted: `none` at 1× is a plain forward of the model on those tokens.
    direct = direct_position_losses(checkpoint, 64, windows=2)
    assert cells[1, "none"]["loss"] == pytest.approx(direct.mean().item(), abs=1e-5)
    buckets = [direct[i : i + 16].mean().item() for i in range(0, 64, 16)]
    assert cells[1, "none"]["bucket_loss"] == pytest.approx(buckets, abs=1e-5)
    for scaling in SCALINGS:  # factor 1 is plain RoPE; factor 2 changes the positions' angles
        assert cells[1, scaling]["loss"] == pytest.approx(cells[1, "none"]["loss"], abs=1e-5)
    assert cells[2, "linear"]["loss"] != pytest.approx(cells[2, "none"]["loss"], abs=1e-6)
    assert (out / "eval_long_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert all(f"  {scaling} " in table for scaling in SCALINGS)


@pytest.mark.slow
def test_default_text_is_the_runs_validation_split(checkpoint, tmp_path):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--multiples", "1"]
    argv += ["--scalings", "none", "--depths", "0.5", "--trials", "1", "--windows", "1"]
    assert script.main(argv) == 0
    summary = json.loads((out / "eval_long_context.json").read_text())
    assert summary["text"]["source"].startswith("validation split of ")
    assert summary["text"]["tokens"] > 0 and math.isfinite(summary["results"][0]["loss"])


def test_unknown_scaling_names_the_registered_ones(tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path), "--scalings", "none", "streched"]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert "--scalings: unknown scaling 'streched'" in err
    assert f"rope_scaling: {', '.join(registry.names('rope_scaling'))}" in err
