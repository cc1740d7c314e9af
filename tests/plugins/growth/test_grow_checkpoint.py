"""scripts/grow_checkpoint.py: a DCP checkpoint grown offline equals the same growth in memory,
and loads into a freshly built grown model and optimizer the way the trainer loads."""

import json
import runpy
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from growth_testing import TINY, batch, random_model
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from arbor_titan.checkpoint.stateful import ModelState, OptimizerState
from arbor_titan.growth import Growth
from arbor_titan.models.arbor import Transformer
from arbor_titan.models.arbor.args import args_to_dict
from arbor_titan.optim import build_optimizer
from arbor_titan.optim.config import OptimizerConfig

SCRIPT = Path(__file__).parents[3] / "scripts" / "grow_checkpoint.py"
PARAMS = ["--op", "clone_width", "--param", "factor=2", "--param", "snr_db=20", "--seed", "3"]

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")


def trained_checkpoint(folder: Path):
    model = random_model(TINY, torch.float32)
    optimizer = build_optimizer(model, OptimizerConfig(implementation="for-loop"))
    model(batch(TINY.vocab_size)).logsumexp(-1).mean().backward()
    optimizer.step()
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    dcp.save({**states, "train_state": {"step": 7}}, checkpoint_id=str(folder))
    (folder / "model_args.json").write_text(json.dumps(args_to_dict(TINY)))
    (folder / "config.toml").write_text("[job]\nname = 'small'\n")
    (folder / "tokenizer.model").write_bytes(b"spm")
    return model, optimizer


def test_offline_growth_matches_in_memory_growth_and_resumes(tmp_path, capsys):
    src, out = tmp_path / "step-1", tmp_path / "grown"
    model, optimizer = trained_checkpoint(src)
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main([str(src), str(out), *PARAMS]) == 0
    log = capsys.readouterr().out
    assert "[1/" in log and "model.tok_embeddings.weight -> 1 entries" in log

    new_args = json.loads((out / "model_args.json").read_text())
    assert (new_args["dim"], new_args["n_heads"]) == (64, 8)
    assert (out / "config.toml").read_text() == (src / "config.toml").read_text()
    assert (out / "tokenizer.model").read_bytes() == b"spm"

    growth = Growth.create("clone_width", TINY, {"factor": 2, "snr_db": 20.0}, seed=3)
    grown = Transformer(growth.new_args)
    grown_optimizer = build_optimizer(grown, OptimizerConfig(implementation="for-loop"))
    train_state = {"step": 0}
    states = {"model": ModelState(grown), "optimizer": OptimizerState(grown, grown_optimizer)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({**states, "train_state": train_state}, checkpoint_id=str(out))
    assert train_state["step"] == 7

    expected = growth.model_state(model.state_dict())
    for name, tensor in grown.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    expected_state = growth.optimizer_state(get_optimizer_state_dict(model, optimizer))["state"]
    loaded_state = get_optimizer_state_dict(grown, grown_optimizer)["state"]
    assert loaded_state.keys() == expected_state.keys()
    for name, entries in expected_state.items():
        for key, tensor in entries.items():
            assert torch.equal(loaded_state[name][key], tensor), f"{name}.{key}"

    x = batch(TINY.vocab_size)
    with torch.no_grad():
        before, after = model(x), grown(x)
    assert (before - after).abs().max() <= 2e-5 * max(1.0, float(before.abs().max()))


def test_refuses_to_overwrite_and_names_bad_params(tmp_path, capsys):
    src, out = tmp_path / "step-1", tmp_path / "grown"
    trained_checkpoint(src)
    main = runpy.run_path(str(SCRIPT))["main"]
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([str(src), str(out), *PARAMS]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "new"), "--op", "deepen", "--param", "layers=[9]"]) == 2
    assert "grow_checkpoint.params.layers: deepen: [9] out of range" in capsys.readouterr().err
