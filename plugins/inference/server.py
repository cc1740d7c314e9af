"""The OpenAI-compatible HTTP server. Handlers validate and enqueue; one `EngineLoop` thread does
all the model work with continuous batching.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (streaming as server-sent events
ending in `data: [DONE]`, or one JSON body), `GET /v1/models`, `GET /health` (503 once the engine
loop died) and `GET /metrics` (Prometheus text). With an API key set, the `/v1/` endpoints need
`Authorization: Bearer KEY`; health and metrics stay open for probes and scrapers.
"""

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plugins.inference.metrics import ServerMetrics
from plugins.inference.openai_api import (
    APIError,
    GenerationRequest,
    chat_body,
    completion_body,
    new_id,
    parse_chat,
    parse_completion,
    usage,
)
from plugins.inference.service import EngineLoop, EngineStopped

DISCONNECT_POLL_S = 0.25
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerConfig:
    model_name: str = "arbor"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # a prompt that fills a 128k-token context is ~0.5 MB of text
    max_waiting: int = 256  # queued requests beyond this get 429


def create_app(loop: EngineLoop, cfg: ServerConfig) -> FastAPI:
    """The FastAPI app serving `loop`'s engine under `cfg.model_name`."""
    app = FastAPI(title="arbor_titan", docs_url=None, redoc_url=None, openapi_url=None)
    metrics, engine, created = loop.metrics, loop.engine, int(time.time())

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(
            APIError(err.status_code, str(err.detail), code=code).body(), err.status_code
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        body = APIError(500, f"internal error: {type(err).__name__}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if loop.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": loop.error or "stopped"}, 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        metrics.queue_length.set(engine.waiting)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, cfg.api_key)
        model = {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "arbor"}
        return JSONResponse({"object": "list", "data": [model]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, parse_completion(await _body(request, cfg)), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        gen = parse_chat(await _body(request, cfg), engine.tokenizer)
        return await _generate(request, gen, chat=True)

    async def _generate(request: Request, gen: GenerationRequest, chat: bool) -> Response:
        if gen.model is not None and gen.model != cfg.model_name:
            message = f"model {gen.model!r} not found; this server serves {cfg.model_name!r}"
            raise APIError(404, message, "model", "model_not_found")
        tokenizer = engine.tokenizer
        text_prompt = not isinstance(gen.prompt, list)
        ids = [tokenizer.bos_id, *tokenizer.encode(gen.prompt)] if text_prompt else gen.prompt
        params = gen.params
        if gen.fill_context:
            params = replace(params, max_new_tokens=max(engine.max_len - len(ids), 1))
        param = "messages" if chat else "prompt"
        if len(ids) + params.max_new_tokens > engine.max_len:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_new_tokens}; "
                f"together they must fit the context of {engine.max_len} tokens",
                param,
                "context_length_exceeded",
            )
        if engine.waiting >= cfg.max_waiting:
            raise APIError(
                429,
                "too many requests are waiting; retry later",
                None,
                "rate_limit_exceeded",
                "rate_limit_error",
            )
        updates: asyncio.Queue = asyncio.Queue()
        aio_loop = asyncio.get_running_loop()

        def on_update(req: Any, delta: str) -> None:  # engine thread → this event loop
            aio_loop.call_soon_threadsafe(updates.put_nowait, (delta, req.finish_reason))

        try:
            req = loop.submit(ids, params, on_update)
        except EngineStopped as err:
            raise APIError(
                503, f"the engine is not running: {err}", None, "engine_unavailable", "server_error"
            ) from err
        except ValueError as err:
            raise APIError(400, str(err), param) from err
        rid, model = new_id("chatcmpl" if chat else "cmpl"), cfg.model_name
        if gen.stream:
            return StreamingResponse(
                _events(req, updates, rid, model, chat, gen.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            finish = await _finish_unless_disconnected(request, updates)
        finally:
            req.cancelled = not req.done.is_set()  # frees the slot of a client that left
        if finish is None:
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        if finish == "error":
            raise APIError(500, req.error or "generation failed", None, None, "server_error")
        build = chat_body if chat else completion_body
        body = build(rid, model, req.text, finish, usage(len(ids), len(req.output_ids)), False)
        return JSONResponse(body)

    async def _events(
        req: Any, updates: asyncio.Queue, rid: str, model: str, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        build = chat_body if chat else completion_body
        try:
            if chat:  # OpenAI's first chunk names the role
                yield _sse(chat_body(rid, model, "", None, None, True, first=True))
            while True:
                delta, finish = await updates.get()
                if finish == "error":
                    error = APIError(500, req.error or "generation failed", type_="server_error")
                    yield _sse(error.body())
                    break
                if delta or finish is not None:
                    yield _sse(build(rid, model, delta, finish, None, True))
                if finish is not None:
                    if include_usage:  # OpenAI's usage chunk has no choices
                        counts = usage(len(req.prompt_ids), len(req.output_ids))
                        yield _sse(build(rid, model, "", None, counts, True) | {"choices": []})
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = not req.done.is_set()  # the client went away mid-stream

    return app


class _CountRequests:
    """Counts every HTTP response by endpoint and status (500 for an exception). Plain ASGI, not
    `BaseHTTPMiddleware`: that one wraps `receive` so handlers no longer see a client leave."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


async def _finish_unless_disconnected(request: Request, updates: asyncio.Queue) -> str | None:
    """The finish reason once generation ends, or None as soon as the client has gone (checked
    every `DISCONNECT_POLL_S`: uvicorn does not cancel a handler whose client left)."""

    async def finished() -> str:
        while (finish := (await updates.get())[1]) is None:
            pass
        return finish

    async def client_left() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    finish, leave = asyncio.ensure_future(finished()), asyncio.ensure_future(client_left())
    await asyncio.wait((finish, leave), return_when=asyncio.FIRST_COMPLETED)
    finish.cancel()
    leave.cancel()
    return finish.result() if finish.done() and not finish.cancelled() else None


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(
            401, "missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key"
        )
    if not secrets.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key provided", None, "invalid_api_key")


async def _body(request: Request, cfg: ServerConfig) -> Any:
    """The request's JSON after the key and size checks (413 before reading a huge body)."""
    _authorize(request, cfg.api_key)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise APIError(
            413, f"request body over {cfg.max_body_bytes} bytes", None, "request_too_large"
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > cfg.max_body_bytes:
            raise APIError(
                413, f"request body over {cfg.max_body_bytes} bytes", None, "request_too_large"
            )
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(
            400, f"the request body is not valid JSON: {err}", None, "invalid_json"
        ) from err


class BackgroundServer:
    """uvicorn serving an app from a thread on a free port (tests and benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(10)

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"
