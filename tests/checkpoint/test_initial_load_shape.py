"""`checkpoint.initial_load_path` builds the model in the saved shape (a grown model's), at this
run's length, and refuses a checkpoint whose vocabulary is not the run's tokenizer's."""

from dataclasses import replace

import pytest

from arbor_titan.checkpoint.config import CheckpointConfig
from arbor_titan.checkpoint.folders import write_model_args
from arbor_titan.checkpoint.manager import CheckpointError, CheckpointManager
from arbor_titan.models.arbor.args import ModelConfig, resolve_args


def initial_args(folder, args):
    manager = CheckpointManager(CheckpointConfig(enable=False, initial_load_path=str(folder)))
    return manager.on_model_args(None, args)  # no trainer needed without checkpointing


def test_a_grown_checkpoint_gives_its_shape_at_this_runs_length(tmp_path):
    args = resolve_args(ModelConfig(flavor="debug"), vocab_size=512, max_seq_len=64)
    grown = replace(args, n_layers=2 * args.n_layers, dim=2 * args.dim, max_seq_len=256)
    write_model_args(grown, tmp_path)
    assert initial_args(tmp_path, args) == replace(grown, max_seq_len=64)


def test_another_vocabulary_or_no_model_args_is_refused(tmp_path):
    args = resolve_args(ModelConfig(flavor="debug"), vocab_size=512, max_seq_len=64)
    write_model_args(replace(args, vocab_size=2000), tmp_path)
    with pytest.raises(CheckpointError) as err:
        initial_args(tmp_path, args)
    assert str(err.value) == (
        f"checkpoint.initial_load_path: {tmp_path} holds a model of vocabulary 2000, this run's "
        f"tokenizer has 512: set tokenizer.path = '{tmp_path / 'tokenizer.model'}' (the model's "
        "own)"
    )
    with pytest.raises(CheckpointError, match="checkpoint.initial_load_path: .*missing"):
        initial_args(tmp_path / "nowhere", args)
