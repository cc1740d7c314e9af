"""Tiny models, tokenizer and checkpoints for the inference tests (made in a second or two)."""

import io
import json
import sysconfig
import warnings
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed.checkpoint as dcp

from arbor_titan.checkpoint.stateful import ModelState
from arbor_titan.models.arbor.args import ArborArgs, args_to_dict
from arbor_titan.models.arbor.model import Transformer

# A few stdlib modules are plenty of text for a 384-piece vocabulary (256 bytes + 3 specials +
# ~90 characters + ~35 merges), and train in well under a second.
_CORPUS_FILES = ("string.py", "textwrap.py", "fnmatch.py")
VOCAB_SIZE = 384


def train_tokenizer(path: Path) -> Path:
    """A lossless BPE tokenizer (the trainer's settings) on a few stdlib modules."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((lib / name).read_text() for name in _CORPUS_FILES)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines(keepends=True)),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_by_whitespace=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def tiny_args(**changes) -> ArborArgs:
    """Two layers with grouped-query attention (4 query heads share 2 kv heads)."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    return ArborArgs(**{**base, "vocab_size": VOCAB_SIZE, **changes})


def random_model(args: ArborArgs, seed: int = 0) -> Transformer:
    """A random model whose outputs are far from uniform, so greedy choices have clear margins:
    the default init (std 0.02) gives near-equal logits, where batched and single matmuls could
    pick different argmaxes from rounding alone."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(seed=seed)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(std=1.0)
        if model.output is not None:
            model.output.weight.normal_(std=0.3)
    return model.eval()


def save_dcp_checkpoint(model: Transformer, folder: Path, tokenizer_path: Path) -> Path:
    """A checkpoint folder laid out as the trainer's: DCP weights, model_args.json, tokenizer."""
    with warnings.catch_warnings():  # one process on purpose
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save({"model": ModelState(model)}, checkpoint_id=str(folder))
    (folder / "model_args.json").write_text(json.dumps(args_to_dict(model.args)))
    (folder / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return folder


def prefill(forward, tokens_s: torch.Tensor, slot: int) -> torch.Tensor:
    """Give `slot` room for the forward's whole length, then prefill it: last token's logits."""
    assert forward.assign(slot, tokens_s.tolist(), forward.max_len) == 0
    return forward.prefill(tokens_s, slot)
