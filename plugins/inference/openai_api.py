"""The OpenAI-compatible request and response bodies, as pydantic models.

Every mistake in a request becomes a 4xx with the OpenAI error body
`{"error": {"message", "type", "param", "code"}}` naming the field. Unknown fields are refused,
and so are OpenAI's fields this server does not implement when set to anything but their no-op
default (`n`, `best_of`, `echo`, `suffix`, `logprobs`, `top_logprobs`, `logit_bias`,
`presence_penalty`, `frequency_penalty`): a 400 names them, nothing is silently ignored. Besides
OpenAI's fields the server takes `top_k`, `repetition_penalty` and `ignore_eos` (vLLM's names;
the last makes benchmarks generate exactly `max_tokens`).

Chat messages are rendered and encoded by the chat template that fine-tuning trains on
(arbor_titan/data/chat_template.py), plain text a base model can continue too:

    [BOS]System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}[EOS]User: ... Assistant:

A fine-tuned model ends its turn with EOS; "\\n\\nUser:" is added to the stop strings, so a base
model ends its turn there instead of writing the user's next one.
"""

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from arbor_titan.data.chat_template import TURN_STOP, Message, encode_prompt
from arbor_titan.data.tokenizer import Tokenizer
from plugins.inference.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI


class APIError(Exception):
    """An error answered with an HTTP status and the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.type = code, type_

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorBody(error=detail).model_dump()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- requests


class _Strict(BaseModel):
    """Types as JSON gives them (no "1" for 1, no true for 1) and no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationBody(_Strict):
    """The fields completions and chat share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # torch's generator range
    ignore_eos: bool = False
    stop: Any = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's fields this server accepts only at their no-op defaults (see `unsupported`).
    n: int = 1
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: Any) -> list[str]:
        stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a non-empty string or a list of them")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings")
        return stop

    def unsupported(self) -> list[str]:
        """The fields set to something this server does not implement."""
        defaults = {"n": 1, "logit_bias": (None, {}), "presence_penalty": 0, "frequency_penalty": 0}
        return [name for name, ok in defaults.items() if not _is(getattr(self, name), ok)]


class CompletionBody(_GenerationBody):
    """`POST /v1/completions`: prompt is a string, a one-string list, or a list of token ids."""

    prompt: Any
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        is_ids = isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)
        if not isinstance(prompt, str) and not is_ids:
            raise ValueError("prompt must be a string or a list of token ids (one per request)")
        return prompt

    def unsupported(self) -> list[str]:
        defaults = {"echo": False, "best_of": (None, 1), "suffix": None, "logprobs": None}
        ours = [name for name, ok in defaults.items() if not _is(getattr(self, name), ok)]
        return super().unsupported() + ours


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Any

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            return "".join(p["text"] for p in content)
        raise ValueError("content must be a string or a list of text parts")


class ChatBody(_GenerationBody):
    """`POST /v1/chat/completions`: messages rendered with the chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def unsupported(self) -> list[str]:
        defaults = {"logprobs": False, "top_logprobs": None}
        ours = [name for name, ok in defaults.items() if not _is(getattr(self, name), ok)]
        return super().unsupported() + ours


@dataclass
class GenerationRequest:
    """A validated request: the prompt (text, or token ids for a completion) and how to sample."""

    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str | None
    fill_context: bool  # no max_tokens given for a chat: generate until the cache is full


def parse_completion(body: Any) -> GenerationRequest:
    request = _validate(CompletionBody, body)
    return _generation(request, request.prompt, request.max_tokens or 16, extra_stop=())


def parse_chat(body: Any, tokenizer: Tokenizer) -> GenerationRequest:
    """A chat request, its messages encoded by the chat template into the prompt's token ids."""
    request = _validate(ChatBody, body)
    messages = [Message(m.role, m.content) for m in request.messages]
    max_tokens = request.max_completion_tokens or request.max_tokens
    prompt = encode_prompt(messages, tokenizer)
    return _generation(request, prompt, max_tokens, extra_stop=(TURN_STOP,))


B = TypeVar("B", bound=_GenerationBody)


def _validate(model: type[B], body: Any) -> B:
    """The body as `model`, or an APIError naming the first bad field (and every unsupported
    one)."""
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"])
        code = "missing_required_parameter" if first["type"] == "missing" else None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}"
        raise APIError(400, f"{param}: {message}" if param else message, param, code) from None
    unsupported = request.unsupported()
    if unsupported:
        raise APIError(
            400,
            f"not supported by this server: {', '.join(unsupported)} (leave them unset)",
            unsupported[0],
            "unsupported_parameter",
        )
    return request


def _generation(
    request: _GenerationBody,
    prompt: str | list[int],
    max_tokens: int | None,
    extra_stop: tuple[str, ...],
) -> GenerationRequest:
    params = SamplingParams(
        max_new_tokens=max_tokens or 1,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=(*request.stop, *extra_stop),
        ignore_eos=request.ignore_eos,
    )
    options = request.stream_options or StreamOptions()
    return GenerationRequest(
        prompt, params, request.stream, options.include_usage, request.model, max_tokens is None
    )


def _param(loc: tuple) -> str | None:
    """Pydantic's error location as OpenAI names a field: `messages[0].role`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text or None


def _is(value: Any, allowed: Any) -> bool:
    return value in allowed if isinstance(allowed, tuple) else value == allowed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatDelta | None = None
    delta: ChatDelta | None = None
    finish_reason: str | None


class _Response(BaseModel):
    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class CompletionResponse(_Response):
    choices: list[CompletionChoice]


class ChatResponse(_Response):
    choices: list[ChatChoice]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def completion_body(
    rid: str, model: str, text: str, finish: str | None, usage_: Usage | None, chunk: bool
) -> dict:
    """A text completion, or one streamed chunk of it (same object type, as OpenAI streams)."""
    choice = CompletionChoice(text=text, finish_reason=finish)
    body = CompletionResponse(
        id=rid, object="text_completion", model=model, choices=[choice], usage=usage_
    )
    return _dump(body, chunk)


def chat_body(
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    usage_: Usage | None,
    chunk: bool,
    first: bool = False,
) -> dict:
    """A chat completion, or a `chat.completion.chunk` whose delta carries the new text."""
    if chunk:
        delta = ChatDelta(
            role="assistant" if first else None, content=text if text or first else None
        )
        choice = ChatChoice(delta=delta, finish_reason=finish)
    else:
        choice = ChatChoice(message=ChatDelta(role="assistant", content=text), finish_reason=finish)
    kind = "chat.completion.chunk" if chunk else "chat.completion"
    return _dump(
        ChatResponse(id=rid, object=kind, model=model, choices=[choice], usage=usage_), chunk
    )


def _dump(body: _Response, chunk: bool) -> dict:
    """OpenAI's shape: a chunk has `usage` only when it carries it, a whole body always; a
    choice has either `message` or `delta`, whose unset fields are left out."""
    data = body.model_dump(exclude={"usage"} if chunk and body.usage is None else set())
    for choice in data["choices"]:
        for key in ("message", "delta"):
            if key in choice:
                if choice[key] is None:
                    del choice[key]
                else:
                    choice[key] = {k: v for k, v in choice[key].items() if v is not None}
    return data
