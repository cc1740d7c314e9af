"""The OpenAI-compatible request and response shapes, independent of the web framework.

Requests are validated field by field so every mistake becomes a 4xx with the OpenAI error body
`{"error": {"message", "type", "param", "code"}}` naming the field. Besides OpenAI's fields the
server takes `top_k` and `repetition_penalty` (vLLM's names).

Chat template (documented for users; the base model was not trained on chat, so it is plain
text a base model can continue):

    System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}\\n\\n ... Assistant:

with "\\n\\nUser:" added to the stop strings, so the model ends its turn instead of writing the
user's next one.
"""

import time
import uuid
from dataclasses import dataclass
from typing import Any

from plugins.inference.sampling import SamplingParams

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\n\nUser:"
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
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


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
    """`POST /v1/completions`: prompt is a string, a one-string list, or a list of token ids."""
    body = _object(body)
    prompt = _required(body, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    is_ids = isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)
    if not isinstance(prompt, str) and not is_ids:
        raise APIError(
            400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt"
        )
    if body.get("echo"):
        raise APIError(400, "echo is not supported", "echo")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", "best_of")
    if body.get("logprobs") is not None:
        raise APIError(400, "logprobs is not supported", "logprobs")
    return _generation(body, prompt, default_max_tokens=16, extra_stop=())


def parse_chat(body: Any) -> GenerationRequest:
    """`POST /v1/chat/completions`: messages rendered with the chat template above."""
    body = _object(body)
    messages = _required(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    parts = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise APIError(
                400, f"{where}.role must be one of {sorted(CHAT_ROLES)}", f"{where}.role"
            )
        parts.append(f"{CHAT_ROLES[role]}: {_content(message.get('content'), where)}\n\n")
    prompt = "".join(parts) + f"{CHAT_ROLES['assistant']}:"
    return _generation(body, prompt, default_max_tokens=None, extra_stop=(CHAT_STOP,))


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise APIError(
        400, f"{where}.content must be a string or a list of text parts", f"{where}.content"
    )


def _generation(
    body: dict, prompt: str | list[int], default_max_tokens: int | None, extra_stop: tuple[str, ...]
) -> GenerationRequest:
    if _number(body, "n", 1, integer=True) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    fill_context = body.get(key) is None and default_max_tokens is None
    max_tokens = _number(body, key, default_max_tokens or 1, integer=True, low=1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
    seed = _number(body, "seed", None, integer=True, low=0, high=2**63 - 1)  # torch's range
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0, high=2),
        top_p=_number(body, "top_p", 1.0, low=0, high=1, low_open=True),
        top_k=_number(body, "top_k", 0, integer=True, low=0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, low=0, low_open=True),
        seed=seed,
        stop=(*stop, *extra_stop),
    )
    return GenerationRequest(
        prompt, params, stream, bool(options.get("include_usage")), model, fill_context
    )


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _required(body: dict, name: str) -> Any:
    if body.get(name) is None:
        raise APIError(400, f"missing required field {name!r}", name, "missing_required_parameter")
    return body[name]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(
    body: dict,
    name: str,
    default: float | None,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok_type = _is_int(value) if integer else _is_int(value) or isinstance(value, float)
    if not ok_type:
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}", name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        bounds += f"{' and ' if bounds else ''}<= {high}" if high is not None else ""
        raise APIError(400, f"{name}={value} is out of range (must be {bounds})", name)
    return value


# -- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    rid: str, model: str, text: str, finish: str | None, usage_: dict | None, chunk: bool
) -> dict:
    """A text completion, or one streamed chunk of it (same object type, as OpenAI streams)."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_body(
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    usage_: dict | None,
    chunk: bool,
    first: bool = False,
) -> dict:
    """A chat completion, or a `chat.completion.chunk` whose delta carries the new text."""
    if chunk:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta if text or first else {}, "finish_reason": finish}
    else:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish}
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body
