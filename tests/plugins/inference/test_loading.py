"""Every weight layout loads into the same model: DCP folder, consolidated .pt, HF folder."""

import shutil

import pytest
import torch

from arbor_titan.checkpoint.convert import dcp_to_torch
from arbor_titan.checkpoint.hf import dcp_to_hf
from plugins.inference.loading import load_model, newest_checkpoint

TOKENS = torch.tensor([[1, 50, 60, 70, 80, 90]])


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


def test_dcp_folder_loads_exact_weights_and_tokenizer(loaded, tiny_model):
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert torch.equal(logits(loaded.model), logits(tiny_model))
    assert loaded.tokenizer.vocab_size == loaded.args.vocab_size


def test_consolidated_pt_and_hf_folder_load_the_same_model(tiny_checkpoint, tiny_model, tmp_path):
    dcp_to_torch(tiny_checkpoint, tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match="model_args.json: missing"):
        load_model(tmp_path / "weights.pt")
    from_pt = load_model(tmp_path / "weights.pt", model_args=tiny_checkpoint)
    assert torch.equal(logits(from_pt.model), logits(tiny_model))

    dcp_to_hf(tiny_checkpoint, tmp_path / "hf")
    from_hf = load_model(tmp_path / "hf")
    assert torch.equal(logits(from_hf.model), logits(tiny_model))
    assert from_hf.tokenizer.path.parent == tmp_path / "hf"


def test_bfloat16_load_stays_close(tiny_checkpoint, tiny_model):
    bf16 = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert bf16.model.tok_embeddings.weight.dtype == torch.bfloat16
    reference = logits(tiny_model)
    error = (logits(bf16.model).float() - reference).abs().max() / reference.abs().max()
    assert error < 0.05


def test_missing_inputs_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_model(tmp_path / "nothing")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer"):
        load_model(copy)
    with pytest.raises(FileNotFoundError, match="train one first with ./run_train.sh"):
        newest_checkpoint(tmp_path / "no_runs")
    (tmp_path / "run" / "step-5").mkdir(parents=True)
    (tmp_path / "run" / "step-20").mkdir()
    assert newest_checkpoint(tmp_path / "run").name == "step-20"
