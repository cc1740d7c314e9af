"""Shared inference fixtures: a tiny tokenizer, a tiny random model and a DCP checkpoint of it."""

from pathlib import Path

import pytest
import torch

from arbor_titan.data.tokenizer import Tokenizer, load_tokenizer
from arbor_titan.models.arbor.model import Transformer
from plugins.inference.loading import LoadedModel, load_model
from tests.plugins.inference.tiny import (
    random_model,
    save_dcp_checkpoint,
    tiny_args,
    train_tokenizer,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on 2 busy cores OpenMP spinning makes each op
    up to 50x slower (measured): run these tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    return random_model(tiny_args())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tokenizer_path) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "step-1"
    return save_dcp_checkpoint(tiny_model, folder, tokenizer_path)


@pytest.fixture(scope="session")
def loaded(tiny_checkpoint) -> LoadedModel:
    return load_model(tiny_checkpoint)
