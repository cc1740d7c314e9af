"""The chat template: the text it renders, which tokens are answers (token by token), and that a
server prompt is encoded exactly as the same conversation prefix was in training."""

import pytest

from arbor_titan.data.chat_template import (
    Message,
    encode_conversations,
    encode_prompt,
    render_text,
)
from arbor_titan.data.tokenizer import load_tokenizer
from tests.plugins.inference.tiny import train_tokenizer

CONVERSATION = [
    Message("system", "Answer briefly."),
    Message("user", "What does `textwrap.dedent` do?"),
    Message("assistant", "Remove any common leading whitespace."),
    Message("user", "And `textwrap.indent`?"),
    Message("assistant", "Adds 'prefix' to the beginning of selected lines."),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def test_the_text_is_plain_role_markers_around_bos_and_eos():
    assert render_text(CONVERSATION[:3], "<s>", "</s>") == (
        "<s>System: Answer briefly.\n\nUser: What does `textwrap.dedent` do?\n\n"
        "Assistant: Remove any common leading whitespace.</s>"
    )
    assert render_text(CONVERSATION[1:2], "<s>", "</s>", add_generation_prompt=True) == (
        "<s>User: What does `textwrap.dedent` do?\n\nAssistant: "
    )


def test_answer_tokens_are_exactly_each_assistant_reply_and_its_eos(tokenizer):
    ((ids, is_answer),) = encode_conversations([CONVERSATION], tokenizer)
    assert len(ids) == len(is_answer) and ids[0] == tokenizer.bos_id and not is_answer[0]
    # Token by token: split the ids into maximal runs of answer / prompt tokens.
    runs: list[tuple[bool, list[int]]] = []
    for token, answer in zip(ids[1:], is_answer[1:]):
        if runs and runs[-1][0] == answer:
            runs[-1][1].append(token)
        else:
            runs.append((answer, [token]))
    eos = [tokenizer.eos_id]
    assert [answer for answer, _ in runs] == [False, True, False, True]
    assert tokenizer.decode(runs[0][1]) == (
        "System: Answer briefly.\n\nUser: What does `textwrap.dedent` do?\n\nAssistant: "
    )
    assert runs[1][1] == tokenizer.encode(CONVERSATION[2].content) + eos
    assert tokenizer.decode(runs[2][1]) == "User: And `textwrap.indent`?\n\nAssistant: "
    assert runs[3][1] == tokenizer.encode(CONVERSATION[4].content) + eos


def test_a_served_prompt_is_the_training_prefix_token_for_token(tokenizer):
    ((trained, is_answer),) = encode_conversations([CONVERSATION], tokenizer)
    served = encode_prompt(CONVERSATION[:4], tokenizer)
    assert trained[: len(served)] == served
    assert is_answer[len(served)]  # the next trained token starts the answer to be generated
    first = encode_prompt(CONVERSATION[:2], tokenizer)
    assert trained[: len(first)] == first and is_answer[len(first)]


def test_an_unknown_role_is_refused(tokenizer):
    with pytest.raises(ValueError, match="role must be one of system, user, assistant, got 'bot'"):
        encode_prompt([Message("bot", "hi")], tokenizer)
