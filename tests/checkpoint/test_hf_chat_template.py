"""An exported model's tokenizer carries the chat template: `transformers`' apply_chat_template
renders every conversation byte for byte as the trainer and the server do."""

import json
from dataclasses import asdict

from arbor_titan.checkpoint.hf import dcp_to_hf
from arbor_titan.data.chat_template import Message, render_text
from tests.conftest import import_or_skip
from tests.plugins.inference.tiny import (
    random_model,
    save_dcp_checkpoint,
    tiny_args,
    train_tokenizer,
)

transformers = import_or_skip("transformers")

CONVERSATIONS = [
    [Message("user", "What does `textwrap.dedent` do?")],
    [
        Message("system", "Be brief.\nVery brief."),
        Message("user", "Hi {name}!"),
        Message("assistant", "Hello.\n\n  Indented, 'quoted' & \"double\"."),
        Message("user", "Again?"),
        Message("assistant", ""),
    ],
]


def test_transformers_renders_the_same_text(tmp_path):
    tokenizer_path = train_tokenizer(tmp_path / "tokenizer.model")
    checkpoint = save_dcp_checkpoint(random_model(tiny_args()), tmp_path / "ckpt", tokenizer_path)
    dcp_to_hf(checkpoint, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            ours = render_text(messages, "<s>", "</s>", generation_prompt)
            theirs = hf.apply_chat_template(
                [asdict(m) for m in messages],
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
            assert theirs == ours
