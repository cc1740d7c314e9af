"""The one chat template: how a conversation becomes tokens, for SFT data and for the server.

A conversation is rendered as plain text around the tokenizer's existing BOS and EOS ids, so the
pre-training tokenizer and its checkpoints serve unchanged (no new special tokens, no resized
embeddings):

    [BOS]System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}[EOS]User: ...

An assistant turn ends with EOS, which is what ends generation at serving time. Training and
serving must see the same token ids, not only the same text, so the template also fixes how the
text is cut for encoding: each maximal run of prompt text (role markers, system and user turns)
is encoded as one string, each answer as another. A server prompt (the conversation so far and
the generation prompt `Assistant: `) is thus encoded exactly as the same prefix was in training.

`JINJA_TEMPLATE` is the same template for Hugging Face's `apply_chat_template` (written into an
exported model's tokenizer_config.json); a test checks that both render byte-identical text.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from arbor_titan.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
_MARKERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
_TURN_END = "\n\n"  # after a system or user turn; an assistant turn ends with EOS
GENERATION_PROMPT = _MARKERS["assistant"]
# What a model that never learned the template writes to begin the user's next turn: servers stop
# there too, so a base model's reply ends where its turn does.
TURN_STOP = "\n\nUser:"

JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('role must be system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Piece:
    """A run of the rendered conversation: `text` (prompt or answer text), or BOS / EOS."""

    kind: str  # "bos", "prompt", "answer" or "eos"
    text: str = ""

    @property
    def is_answer(self) -> bool:
        """Whether the model is trained to produce it: answer text and the EOS that ends it."""
        return self.kind in ("answer", "eos")


def pieces(messages: Sequence[Message], add_generation_prompt: bool = False) -> Iterator[Piece]:
    """The conversation as BOS, maximal prompt runs, answers and EOS, in order."""
    yield Piece("bos")
    prompt = ""
    for message in messages:
        if message.role not in _MARKERS:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {message.role!r}")
        if message.role != "assistant":
            prompt += _MARKERS[message.role] + message.content + _TURN_END
            continue
        yield Piece("prompt", prompt + _MARKERS["assistant"])
        yield Piece("answer", message.content)
        yield Piece("eos")
        prompt = ""
    if add_generation_prompt:
        prompt += GENERATION_PROMPT
    if prompt:
        yield Piece("prompt", prompt)


def render_text(
    messages: Sequence[Message], bos_token: str, eos_token: str, add_generation_prompt: bool = False
) -> str:
    """The conversation as text, BOS and EOS spelled `bos_token` / `eos_token` (what
    `apply_chat_template(..., tokenize=False)` returns for `JINJA_TEMPLATE`)."""
    names = {"bos": bos_token, "eos": eos_token}
    return "".join(names.get(p.kind, p.text) for p in pieces(messages, add_generation_prompt))


def encode_conversations(
    conversations: Sequence[Sequence[Message]], tokenizer: Tokenizer
) -> list[tuple[list[int], list[bool]]]:
    """Each conversation's token ids and, per token, whether it is answer (trained) or prompt.
    The texts of all conversations are encoded in one batched (multi-threaded) call."""
    runs = [list(pieces(messages)) for messages in conversations]
    texts = [p.text for run in runs for p in run if p.kind not in _SPECIALS]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    return [_assemble(run, encoded, tokenizer) for run in runs]


def encode_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """The token ids that a chat request's conversation is served from: the conversation so far
    and the generation prompt, cut for encoding exactly as in training."""
    run = list(pieces(messages, add_generation_prompt=True))
    encoded = iter([tokenizer.encode(p.text) for p in run if p.kind not in _SPECIALS])
    ids, _ = _assemble(run, encoded, tokenizer)
    return ids


_SPECIALS = ("bos", "eos")


def _assemble(
    run: list[Piece], encoded: Iterator[list[int]], tokenizer: Tokenizer
) -> tuple[list[int], list[bool]]:
    """Token ids of `run`, its text pieces taken in order from `encoded`, and answer flags."""
    ids: list[int] = []
    answer: list[bool] = []
    for piece in run:
        if piece.kind in _SPECIALS:
            piece_ids = [tokenizer.bos_id if piece.kind == "bos" else tokenizer.eos_id]
        else:
            piece_ids = next(encoded)
        ids += piece_ids
        answer += [piece.is_answer] * len(piece_ids)
    return ids, answer
