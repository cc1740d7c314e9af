"""Chat data: malformed lines are skipped with `file:line` messages, the loader's labels count
exactly the answer tokens (token by token), and the loss ignores everything else."""

import json
import logging

import pytest
import torch

from arbor_titan.data import DataConfig, TokenizerConfig, build_dataloader, prepare_data
from arbor_titan.data.chat import ANSWER_FLAG, answer_labels, parse_conversation
from arbor_titan.data.chat_template import Message
from arbor_titan.data.dataset import Documents, epoch_stream
from arbor_titan.data.tokenizer import load_tokenizer
from arbor_titan.models.arbor.loss import IGNORE_INDEX, cross_entropy_loss
from tests.data.conftest import LogLines
from tests.plugins.inference.tiny import train_tokenizer

QUESTIONS = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a in range(12) for b in range(4)]


def chat_lines() -> list[str]:
    """Both accepted shapes, alternating; every third has a system message."""
    lines = []
    for i, (question, answer) in enumerate(QUESTIONS):
        if i % 2:
            lines.append(json.dumps({"prompt": question, "response": answer}))
            continue
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Be exact."})
        lines.append(json.dumps({"messages": messages}))
    return lines


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def prepare(tmp_path, tokenizer_path, lines, log=print, **data):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="chat", paths=[str(path)], document_mask=True, **data)
    return prepare_data(
        cfg, TokenizerConfig(path=str(tokenizer_path)), tmp_path / "cache", False, log
    )


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ([1, 2], "a line must be a JSON object"),
        ({"text": "hi"}, "a line needs 'messages'"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\].role must be one of"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no non-empty assistant message"),
        ({"prompt": "hi"}, "'prompt' and 'response' must both be strings"),
    ],
)
def test_a_malformed_record_says_what_is_wrong(record, problem):
    with pytest.raises(ValueError, match=problem):
        parse_conversation(record)


def test_prompt_response_is_one_user_and_one_assistant_turn():
    assert parse_conversation({"prompt": "q", "response": "a"}) == [
        Message("user", "q"),
        Message("assistant", "a"),
    ]


def test_malformed_lines_are_skipped_counted_and_named_by_file_and_line(
    tmp_path, tokenizer_path, caplog
):
    lines = chat_lines()
    lines[3] = '{"messages": [{"role": "bot", "content": "x"}]}'
    lines[7] = "{not json"
    log = LogLines()
    with caplog.at_level(logging.WARNING, logger="arbor_titan"):
        prepared = prepare(tmp_path, tokenizer_path, lines, log, val_fraction=0)
    path = tmp_path / "chat.jsonl"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"skipped {path}:4: messages[0].role must be one of system, user, assistant, got 'bot'",
        f"skipped {path}:8: invalid JSON (Expecting property name enclosed in double quotes)",
    ]
    assert prepared.cache.num_docs == {"train": len(lines) - 2, "val": 0}
    assert "skipped 2 documents: 1 malformed conversation, 1 invalid JSON" in log[-1]


def test_a_file_without_a_usable_conversation_stops_the_run_naming_it(tmp_path, tokenizer_path):
    with pytest.raises(ValueError) as err:
        prepare(tmp_path, tokenizer_path, ['{"prompt": 1, "response": "a"}', "[]"])
    path = tmp_path / "chat.jsonl"
    assert str(err.value) == (
        f"data.paths: {path} holds no usable conversation: {path}:1: 'prompt' and 'response' "
        "must both be strings"
    )


def test_chat_needs_the_models_tokenizer_and_document_masking(tmp_path):
    cfg = DataConfig(source="chat", paths=[str(tmp_path / "x.jsonl")], document_mask=True)
    with pytest.raises(ValueError, match="data.source = 'chat' needs tokenizer.path"):
        prepare_data(cfg, TokenizerConfig(), tmp_path, False)
    with pytest.raises(ValueError, match="needs data.document_mask = true"):
        prepare_data(
            DataConfig(source="chat", paths=["x.jsonl"]), TokenizerConfig(), tmp_path, False
        )


def test_labels_count_exactly_the_answer_tokens_token_by_token(tmp_path, tokenizer_path):
    prepared = prepare(tmp_path, tokenizer_path, chat_lines(), val_fraction=0)
    tokenizer = load_tokenizer(tokenizer_path)
    loader = build_dataloader(prepared, "train", 64, 4, 0, 1, seed=0)
    inputs, labels = next(loader)
    # The same windows, read raw from the stored stream: the flags say which tokens are answers.
    stream = epoch_stream(Documents(prepared.cache.tokens("train"), tokenizer.bos_id), 0)
    raw = torch.stack(
        [
            torch.from_numpy(stream.read(start, stop - start))
            for start, stop in loader.last_origin.spans()
        ]
    )
    tokens, flagged = raw & (ANSWER_FLAG - 1), (raw & ANSWER_FLAG) != 0
    assert torch.equal(inputs, tokens[:, :-1]) and inputs.max() < tokenizer.vocab_size
    for row in range(len(labels)):
        for i in range(labels.shape[1]):
            expected = tokens[row, i + 1] if flagged[row, i + 1] else IGNORE_INDEX
            assert labels[row, i] == expected, (row, i)
    # The flagged tokens are the answers and their EOS, and nothing else.
    answers = {tokenizer.encode(answer)[0] for _, answer in QUESTIONS}
    starts = flagged[:, 1:] & ~flagged[:, :-1]
    assert set(tokens[:, 1:][starts].tolist()) <= answers
    ends = flagged[:, :-1] & ~flagged[:, 1:]
    assert set(tokens[:, :-1][ends].tolist()) == {tokenizer.eos_id}
    assert not flagged[tokens == tokenizer.bos_id].any()
    text = tokenizer.decode(tokens[0][flagged[0]].tolist())
    assert "What is" not in text and "User:" not in text and "=" in text


def test_the_loss_is_the_mean_over_answer_tokens_only(tmp_path, tokenizer_path):
    prepared = prepare(tmp_path, tokenizer_path, chat_lines(), val_fraction=0)
    inputs, labels = next(build_dataloader(prepared, "train", 64, 4, 0, 1, seed=0))
    logits = torch.randn(*labels.shape, 384, generator=torch.Generator().manual_seed(0))
    counted = labels != IGNORE_INDEX
    assert 0 < counted.sum() < counted.numel()
    log_probs = logits.log_softmax(-1)
    expected = -log_probs[counted].gather(-1, labels[counted][:, None]).mean()
    torch.testing.assert_close(cross_entropy_loss(logits, labels), expected)
    # Changing a prompt position's logits changes nothing.
    row, col = (~counted).nonzero()[0].tolist()
    logits[row, col] += 100
    torch.testing.assert_close(cross_entropy_loss(logits, labels), expected)


def test_answer_labels_of_a_window():
    window = torch.tensor([1, 5, 6 | ANSWER_FLAG, 7 | ANSWER_FLAG, 2 | ANSWER_FLAG, 1, 8])
    inputs, labels = answer_labels(window)
    assert inputs.tolist() == [1, 5, 6, 7, 2, 1]
    assert labels.tolist() == [IGNORE_INDEX, 6, 7, 2, IGNORE_INDEX, IGNORE_INDEX]


def test_the_cache_is_reused_and_split_by_conversation(tmp_path, tokenizer_path):
    first = prepare(tmp_path, tokenizer_path, chat_lines(), val_fraction=0.25)
    log = LogLines()
    cfg = DataConfig(
        source="chat", paths=[str(tmp_path / "chat.jsonl")], document_mask=True, val_fraction=0.25
    )
    again = prepare_data(
        cfg, TokenizerConfig(path=str(tokenizer_path)), tmp_path / "cache", False, log
    )
    assert any(line.startswith("reusing chat token cache") for line in log)
    assert again.cache.pieces == first.cache.pieces
    docs = first.cache.num_docs
    assert docs["val"] > 0 and docs["train"] + docs["val"] == len(QUESTIONS)
