"""OpenAI's endpoints: models, chat and text completions, embeddings, rerank.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(the prompt answered as one user turn through the chat engine), ``POST /v1/embeddings``,
``POST /v1/rerank``.

One ``APIRouter`` over the shared dependencies of :mod:`.deps` (the API key, the JSON body, the
server's state and its admission line) and the pure translations of :mod:`.wire`. Every failure is
answered with OpenAI's error object by :func:`error_response`. Streams are Server-Sent Events
ending with ``data: [DONE]``; a client that disconnects aborts its generation on the NPU (the
response generator is closed, which closes the engine's stream). A generation the server's
shutdown cuts short ends as a truncated answer does: a last chunk with ``finish_reason`` ``"length"``
(the one value of OpenAI's set that means "cut short", so every client accepts it), preceded by the
SSE comment ``: aborted: the server is shutting down``, then ``data: [DONE]``; a whole response
cut this way is a 503 ``shutting_down`` error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..chat.engine import ChatDone
from ..errors import RKLLMError
from . import wire
from .admission import Place
from .deps import (
    JsonBody,
    Note,
    ShutdownError,
    State,
    metered,
    problem_of,
    protocol_route,
    require_api_key,
)

__all__ = ["PREFIX", "error_response", "router"]

PREFIX = "/v1"
"""Where this protocol's routes live (unknown paths under it get OpenAI's error object too)."""

_Shape = wire.ChatStream | wire.TextStream
"""How a stream's events become chunks (chat or text completion)."""

_DONE = b"data: [DONE]\n\n"
_ABORTED = b": aborted: the server is shutting down\n\n"
_CUT_FINISH = "length"


def _error_object(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: Exception) -> JSONResponse:
    """OpenAI's error object, with the status and headers :func:`~.deps.problem_of` gives ``exc``."""
    p = problem_of(exc)
    body = _error_object(p.message, p.kind, p.param, p.code)
    return JSONResponse(body, status_code=p.status, headers=dict(p.headers) or None)


router = APIRouter(route_class=protocol_route(error_response), dependencies=[Depends(require_api_key)])


@router.get(PREFIX + "/models")
async def list_models(state: State) -> Response:
    """Every model the registry lists, with kind, context length and whether it is loaded."""
    infos = state.manager.registry.models()
    loaded = frozenset(e.info.name for e in state.manager.loaded())
    return JSONResponse(wire.models_list(infos, loaded))


@router.get(PREFIX + "/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> Response:
    """One model (what ``client.models.retrieve()`` reads); an alias answers with the model's own name."""
    info = state.manager.resolve(model_id)
    return JSONResponse(wire.model_object(info, state.manager.is_loaded(info.name)))


@router.post(PREFIX + "/chat/completions")
async def chat_completions(body: JsonBody, state: State, note: Note) -> Response:
    """A chat completion, whole or streamed (``X-RKLLM-KV-Reused`` says whether the KV cache was reused)."""
    req = wire.chat_request(body, max_tokens_limit=state.settings.max_tokens, images=state.settings.images)
    if len(req.messages) > state.settings.max_messages:
        raise wire.WireError(f"more than {state.settings.max_messages} messages", "messages")
    completion_id, created = wire.new_completion_id()
    if req.stream:
        shape = wire.ChatStream(completion_id, created, req.model, req.parallel_tool_calls)
        return await _streamed(state, note, req, shape)
    done = await _whole(state, note, req)
    if not req.parallel_tool_calls and len(done.message.tool_calls) > 1:
        done = replace(done, message=replace(done.message, tool_calls=done.message.tool_calls[:1]))
    return JSONResponse(wire.chat_completion(done, completion_id, created), headers=_done_headers(done))


@router.post(PREFIX + "/completions")
async def completions(body: JsonBody, state: State, note: Note) -> Response:
    """A text completion: the prompt is answered as one user turn through the chat engine, whole or streamed."""
    req = wire.completion_request(body, max_tokens_limit=state.settings.max_tokens)
    completion_id, created = wire.new_completion_id("cmpl")
    if req.stream:
        return await _streamed(state, note, req, wire.TextStream(completion_id, created, req.model))
    done = await _whole(state, note, req)
    return JSONResponse(wire.text_completion(done, completion_id, created), headers=_done_headers(done))


@router.post(PREFIX + "/embeddings")
async def embeddings(body: JsonBody, state: State, note: Note) -> Response:
    """Embeddings of one text or a list, as floats or base64."""
    model, texts, encoding = wire.embedding_request(body)
    note.model = model
    with state.admit(model):
        result = await state.embed.aembed(model, texts, timeout=state.settings.queue_timeout)
    state.metrics.record_tokens(result.model, "embedded", result.input_tokens)
    note.prompt_tokens = result.input_tokens
    return JSONResponse(wire.embeddings_response(result.vectors, result.model, result.input_tokens, encoding))


@router.post(PREFIX + "/rerank")
async def rerank(body: JsonBody, state: State, note: Note) -> Response:
    """Documents ranked by relevance to a query (the Cohere/Jina shape)."""
    model, query, docs, top_n, with_docs = wire.rerank_request(body)
    note.model = model
    with state.admit(model):
        result = await state.embed.arerank(model, query, docs, timeout=state.settings.queue_timeout)
    state.metrics.record_tokens(result.model, "reranked", result.input_tokens)
    note.prompt_tokens = result.input_tokens
    return JSONResponse(wire.rerank_response(result.scores, docs, result.model, result.input_tokens, top_n, with_docs))


def _kv_header(reused: bool) -> dict[str, str]:
    return {"X-RKLLM-KV-Reused": "true" if reused else "false"}


def _done_headers(done: ChatDone) -> dict[str, str]:
    """A whole answer's headers: KV reuse, and how its sampling was served (``run`` on 1.3)."""
    return {**_kv_header(done.kv_reused), "X-RKLLM-Sampling-Policy": done.sampling_policy}


def _generate(
    state: State, note: Note, req: wire.ChatRequest, on_start: Callable[[bool], None] | None = None
) -> tuple[AsyncGenerator[object, None], Place]:
    """The request's place in line and its events: metered, and cut by the server's shutdown."""
    note.model = req.model
    place = state.admit(req.model)
    opts = req.options
    if opts.timeout is None:
        opts = replace(opts, timeout=state.settings.queue_timeout)
    engine_events = state.chat.astream(req.model, req.messages, opts, on_start=on_start)
    return state.stopping.until_abort(metered(engine_events, state.metrics, place.release, note)), place


async def _whole(state: State, note: Note, req: wire.ChatRequest) -> ChatDone:
    """The whole answer (a 503 ``shutting_down`` when the server's shutdown cut it)."""
    events, place = _generate(state, note, req)
    done = None
    try:
        async for event in events:
            if isinstance(event, ChatDone):
                done = event
    finally:
        await events.aclose()
        place.release()
    if done is None:
        raise ShutdownError("the server is shutting down; the request was aborted")
    return done


async def _streamed(state: State, note: Note, req: wire.ChatRequest, shape: _Shape) -> StreamingResponse:
    """The SSE response, once the first event is in: a bad model name is then a 4xx, not a broken stream.

    The engine says whether it reuses the KV cache before the run starts, so the stream's headers
    carry ``X-RKLLM-KV-Reused`` as a whole response's do.
    """
    reused: list[bool] = []
    events, place = _generate(state, note, req, reused.append)
    try:
        first = await events.__anext__()
    except StopAsyncIteration:  # aborted by the shutdown before the first event
        await events.aclose()
        place.release()
        raise ShutdownError("the server is shutting down; the request was aborted") from None
    except BaseException:
        await events.aclose()
        place.release()
        raise
    return StreamingResponse(
        _sse(first, events, shape, req.include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **(_kv_header(reused[0]) if reused else {})},
        background=BackgroundTask(place.release),  # also when the stream never started
    )


def _frame(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _sse(
    first: object, events: AsyncGenerator[object, None], shape: _Shape, include_usage: bool
) -> AsyncIterator[bytes]:
    """The stream as SSE: the head chunk, one chunk per event, usage if asked, ``[DONE]``.

    Closing this generator (the client went away) closes the engine's stream, which aborts the run.
    """
    event = first
    try:
        head = shape.head()
        if head is not None:
            yield _frame(head)
        while not isinstance(event, ChatDone):
            chunk = shape.chunk(event)
            if chunk is not None:
                yield _frame(chunk)
            try:
                event = await events.__anext__()
            except StopAsyncIteration:  # cut by the server's shutdown
                yield _ABORTED
                yield _frame(shape.cut(_CUT_FINISH))
                yield _DONE
                return
            except RKLLMError as exc:  # after the headers: report in-band, as OpenAI does
                yield _frame(_error_object(str(exc), "server_error"))
                return
        last = shape.chunk(event)
        if last is not None:
            yield _frame(last)
        if include_usage:
            yield _frame(shape.usage(event))
        yield _DONE
    finally:
        await events.aclose()
