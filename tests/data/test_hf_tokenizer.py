"""`tokenizer.path` = a Hugging Face tokenizer.json: the same encode/decode as `tokenizers` itself,
BOS/EOS by name, packing, and the file travelling through HF export and import."""

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
import torch.distributed.checkpoint as dcp
from tokenizers import decoders, models, pre_tokenizers, trainers

from arbor_titan.checkpoint.folders import TOKENIZER_FILE, write_model_args
from arbor_titan.checkpoint.hf import dcp_to_hf, hf_to_dcp
from arbor_titan.checkpoint.stateful import ModelState
from arbor_titan.data import DataConfig, TokenizerConfig, load_tokenizer, prepare_data
from arbor_titan.data.hf_tokenizer import HFTokenizer
from arbor_titan.models.arbor.args import ArborArgs
from arbor_titan.models.arbor.model import Transformer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
TEXTS = [
    "def f(x):\n    return x * 2\n",
    "\tTabs, trailing spaces  \r\nand CRLF\r\n",
    "é 世界 🐍 \x00\u00a0\ufeff",
    "a literal <|begin_of_text|> and <|end_of_text|> in a document",
    "",
]


def train_tokenizer_json(path: Path, specials: list[str] = SPECIALS) -> Path:
    """A byte-level BPE tokenizer.json (Llama 3's kind), trained by `tokenizers` itself."""
    model = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [f"def f{i}(x):\n    return x * {i} + {i * i}  # é\n" for i in range(300)]
    model.train_from_iterator(lines, trainer)
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def json_path(tmp_path_factory) -> Path:
    return train_tokenizer_json(tmp_path_factory.mktemp("hf_tok") / "tokenizer.json")


def test_encode_and_decode_equal_the_tokenizers_library(json_path):
    ours = load_tokenizer(json_path)
    reference = tokenizers.Tokenizer.from_file(str(json_path))
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS[:3] + TEXTS[4:]:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == reference.decode(ids) == text
    assert ours.encode_batch(TEXTS) == [ours.encode(text) for text in TEXTS]
    assert ours.vocab_size == reference.get_vocab_size(with_added_tokens=True)


def test_special_names_in_a_document_are_text_not_specials(json_path):
    tokenizer = load_tokenizer(json_path)
    ids = tokenizer.encode(TEXTS[3])
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == TEXTS[3]


def test_bos_and_eos_found_by_name_or_given(json_path):
    found = load_tokenizer(json_path)
    reference = tokenizers.Tokenizer.from_file(str(json_path))
    assert found.bos_id == reference.token_to_id("<|begin_of_text|>")
    assert found.eos_id == reference.token_to_id("<|end_of_text|>")
    given = load_tokenizer(json_path, eos_token="<|eot_id|>")
    assert (given.bos_id, given.eos_id) == (found.bos_id, reference.token_to_id("<|eot_id|>"))


def test_bad_special_tokens_are_named(json_path, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.bos_token: '<nope>' is not a token"):
        load_tokenizer(json_path, bos_token="<nope>")
    with pytest.raises(ValueError, match="BOS and EOS are the same token"):
        load_tokenizer(json_path, bos_token="<|eot_id|>", eos_token="<|eot_id|>")
    bare = train_tokenizer_json(tmp_path / "bare.json", ["<unk>", "<|endoftext|>"])
    with pytest.raises(ValueError, match=r"has none of .*tokenizer.bos_token .*'<\|endoftext\|>'"):
        load_tokenizer(bare)


def test_bad_files_are_named(tmp_path, stdlib_data):
    (tmp_path / "broken.json").write_text('{"version": "1.0"')
    with pytest.raises(ValueError, match=r"'.*broken\.json' is not a tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "junk.model").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a tokenizer.json"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="tokenizer.bos_token applies to a tokenizer.json"):
        load_tokenizer(stdlib_data.tokenizer.path, bos_token="<s>")


def test_prepare_packs_with_the_json_tokenizer(json_path, tmp_path, log):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4] * 10))
    data = prepare_data(
        DataConfig(source="jsonl", paths=[str(corpus)], val_fraction=0.0),
        TokenizerConfig(path=str(json_path)),
        tmp_path / "cache",
        show_progress=False,
        log=log,
    )
    tokens = np.asarray(data.cache.tokens("train"))
    tokenizer = data.tokenizer
    framed = ([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] for text in TEXTS[:4])
    assert tokens.tolist() == [token for document in framed for token in document] * 10
    assert data.cache.num_docs["train"] == 40


def test_tokenizer_json_travels_through_hf_export_and_import(json_path, tmp_path):
    args = ArborArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_size=400)
    checkpoint = tmp_path / "step-1"
    dcp.save({"model": ModelState(Transformer(args))}, checkpoint_id=str(checkpoint), no_dist=True)
    write_model_args(args, checkpoint)
    (checkpoint / TOKENIZER_FILE).write_bytes(json_path.read_bytes())  # as the trainer copies it

    dcp_to_hf(checkpoint, tmp_path / "hf", dtype=torch.float32)
    tokenizer = load_tokenizer(json_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == json_path.read_bytes()
    assert not (tmp_path / "hf" / TOKENIZER_FILE).exists()

    hf_to_dcp(tmp_path / "hf", tmp_path / "imported")
    imported = load_tokenizer(tmp_path / "imported" / TOKENIZER_FILE)
    assert isinstance(imported, HFTokenizer)
    assert imported.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
