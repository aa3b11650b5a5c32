"""The OpenAI-compatible HTTP app: FastAPI routes over :class:`ChatEngine` and :class:`EmbeddingEngine`.

Every request goes through the same model manager as the in-process adapters, so the server has
what they have: KV-cache reuse for clients that resend the history, the prompt cache, swapping
within a budget, honest usage, typed errors (as OpenAI error objects). Streams are Server-Sent
Events ending with ``data: [DONE]``; a client that disconnects aborts its generation on the NPU
(the response generator is closed, which closes the engine's stream).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..chat.engine import ChatDone, ChatEngine, ReasoningDelta, TextDelta, ToolCallDelta
from ..embed import EmbeddingEngine
from ..errors import (
    BusyError,
    ContextLengthError,
    InvalidParameterError,
    ModelKindError,
    ModelNotFoundError,
    RKLLMError,
)
from ..models.manager import ModelManager
from . import wire
from .metrics import ServerMetrics

__all__ = ["ServerSettings", "create_app"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits and identity of one server.

    Attributes:
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``.
        board: the name this server reports in ``X-RKLLM-Board`` (default: the host name).
        max_body_bytes: larger request bodies get 413.
        max_messages: more messages in one request get 400.
        max_tokens: a larger ``max_tokens`` / ``max_completion_tokens`` gets 400.
        max_waiting: requests one model may have in flight (running or waiting for the NPU) before a
            new one for it gets 429 with ``Retry-After``.
        queue_timeout: seconds a request may wait for its model before 429.
    """

    api_key: str | None = None
    board: str = ""
    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 512
    max_tokens: int = 8192
    max_waiting: int = 64
    queue_timeout: float = 120.0


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _error_for(exc: Exception) -> JSONResponse:
    """OpenAI's error object for a core error (the process keeps serving after every one)."""
    if isinstance(exc, wire.WireError):
        return _error(400, str(exc), "invalid_request_error", exc.param)
    if isinstance(exc, ModelNotFoundError):
        return _error(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, ModelKindError):
        return _error(400, str(exc), "invalid_request_error", "model", "wrong_model_kind")
    if isinstance(exc, ContextLengthError):
        return _error(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, InvalidParameterError):
        return _error(400, str(exc), "invalid_request_error")
    if isinstance(exc, BusyError):
        return _error(429, str(exc), "rate_limit_error", None, f"busy_{exc.reason}")
    logger.exception("request failed")
    return _error(500, str(exc), "server_error")


def create_app(manager: ModelManager, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving ``manager``'s models (the caller closes the manager).

    Args:
        manager: where models come from.
        settings: limits and identity (defaults: :class:`ServerSettings`).
    """
    cfg = settings or ServerSettings()
    board = cfg.board or socket.gethostname()
    chat = ChatEngine(manager)
    embed = EmbeddingEngine(manager)
    app = FastAPI(title="rkllm serve", version="1", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(manager)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if request.url.path != "/health" and cfg.api_key is not None:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {cfg.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return _error(
                    401,
                    "a valid API key is required (Authorization: Bearer ...)",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            return _error(413, f"the request body is larger than {cfg.max_body_bytes} bytes", "invalid_request_error")
        response: Response = await call_next(request)
        response.headers["X-RKLLM-Board"] = board
        route = request.scope.get("route")  # a route's own path, so clients cannot invent label values
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise wire.WireError(f"the request body is larger than {cfg.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise wire.WireError(f"the body is not valid JSON: {exc}") from exc

    inflight: dict[str, int] = {}

    def enter_line(model: str) -> Callable[[], None]:
        """Take a place in ``model``'s bounded line; returns the (idempotent) release."""
        name = manager.resolve(model).name
        count = inflight.get(name, 0)
        if count >= cfg.max_waiting:
            raise BusyError(f"{count} requests for {name} are already in line; try again shortly", reason="busy")
        inflight[name] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                inflight[name] -= 1

        return release

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "board": board, "loaded": sorted(e.info.name for e in manager.loaded())}

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Any:
        try:
            infos = manager.registry.models()
        except RKLLMError as exc:
            return _error_for(exc)
        loaded = {e.info.name for e in manager.loaded()}
        data = [
            {
                "id": info.name,
                "object": "model",
                "created": 0,
                "owned_by": "rkllm",
                "kind": info.kind,
                "context_length": info.context_size,
                "loaded": info.name in loaded,
                "file": info.filename,
            }
            for info in infos
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            req = wire.chat_request(await body_of(request), max_tokens_limit=cfg.max_tokens)
            if len(req.messages) > cfg.max_messages:
                raise wire.WireError(f"more than {cfg.max_messages} messages", "messages")
            release = enter_line(req.model)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error object
            return _error_for(exc)
        options = req.options if req.options.timeout is not None else _with_timeout(req.options, cfg.queue_timeout)
        completion_id, created = wire.new_completion_id()
        events = _timed(chat.astream(req.model, req.messages, options), metrics, release)
        if not req.stream:
            try:
                done = await _last(events)
            except Exception as exc:  # noqa: BLE001
                return _error_for(exc)
            finally:
                release()
            if not req.parallel_tool_calls and len(done.message.tool_calls) > 1:
                done = _first_call_only(done)
            headers = {"X-RKLLM-KV-Reused": "true" if done.kv_reused else "false"}
            return JSONResponse(wire.chat_completion(done, completion_id, created), headers=headers)
        # Start the stream before answering, so that a bad model name is a 4xx, not a broken stream.
        try:
            first = await events.__anext__()
        except Exception as exc:  # noqa: BLE001
            await events.aclose()
            release()
            return _error_for(exc)
        return StreamingResponse(
            _sse(first, events, req, completion_id, created),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            background=BackgroundTask(release),  # also when the stream never started
        )

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        try:
            model, texts, encoding = wire.embedding_request(await body_of(request))
            release = enter_line(model)
            try:
                result = await embed.aembed(model, texts, timeout=cfg.queue_timeout)
            finally:
                release()
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)
        metrics.record_tokens(result.model, "embedded", result.input_tokens)
        return JSONResponse(wire.embeddings_response(result.vectors, result.model, result.input_tokens, encoding))

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> Response:
        try:
            model, query, docs, top_n, with_docs = wire.rerank_request(await body_of(request))
            release = enter_line(model)
            try:
                result = await embed.arerank(model, query, docs, timeout=cfg.queue_timeout)
            finally:
                release()
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)
        metrics.record_tokens(result.model, "reranked", result.input_tokens)
        return JSONResponse(
            wire.rerank_response(result.scores, docs, result.model, result.input_tokens, top_n, with_docs)
        )

    return app


def _with_timeout(options: Any, timeout: float) -> Any:
    from dataclasses import replace

    return replace(options, timeout=timeout)


async def _timed(
    events: AsyncGenerator[Any, None], metrics: ServerMetrics, release: Callable[[], None]
) -> AsyncGenerator[object, None]:
    """The engine's events, recording time to first token and usage; gives the line place back at the end."""
    start = time.monotonic()
    ttft: float | None = None
    try:
        async for event in events:
            if ttft is None and isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta):
                ttft = time.monotonic() - start
            if isinstance(event, ChatDone):
                metrics.record_chat(event, ttft)
            yield event
    finally:
        release()
        await events.aclose()


async def _last(events: AsyncGenerator[object, None]) -> ChatDone:
    done = None
    try:
        async for event in events:
            if isinstance(event, ChatDone):
                done = event
    finally:
        await events.aclose()
    assert done is not None
    return done


def _first_call_only(done: ChatDone) -> ChatDone:
    from dataclasses import replace

    return replace(done, message=replace(done.message, tool_calls=done.message.tool_calls[:1]))


async def _sse(
    first: object, events: AsyncGenerator[object, None], req: wire.ChatRequest, completion_id: str, created: int
) -> AsyncIterator[bytes]:
    """The stream as SSE: a role chunk, one chunk per event, usage if asked, ``[DONE]``.

    Closing this generator (the client went away) closes the engine's stream, which aborts the run.
    """

    def frame(obj: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    model = req.model
    try:
        yield frame(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
        )
        pending = [first]
        while True:
            for event in pending:
                if isinstance(event, ToolCallDelta) and event.index > 0 and not req.parallel_tool_calls:
                    continue
                if isinstance(event, ChatDone):
                    model = event.model
                    chunk = wire.chat_chunk(event, completion_id, created, model)
                    if chunk is not None:
                        if event.message.tool_calls and not req.parallel_tool_calls:
                            chunk["choices"][0]["finish_reason"] = "tool_calls"
                        yield frame(chunk)
                    if req.include_usage:
                        yield frame(
                            {
                                "id": completion_id,
                                "object": "chat.completion.chunk",
                                "created": created,
                                "model": model,
                                "choices": [],
                                "usage": wire.usage_of(event),
                            }
                        )
                    yield b"data: [DONE]\n\n"
                    return
                chunk = wire.chat_chunk(event, completion_id, created, model)
                if chunk is not None:
                    yield frame(chunk)
            try:
                pending = [await events.__anext__()]
            except StopAsyncIteration:
                yield b"data: [DONE]\n\n"
                return
            except RKLLMError as exc:  # after the headers: report in-band, as OpenAI does
                yield frame({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
                return
    finally:
        await events.aclose()
