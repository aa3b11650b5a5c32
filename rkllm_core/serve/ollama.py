"""Ollama's endpoints, on the same process and port as OpenAI's: ``/api/*``, and ``GET``/``HEAD /``.

One ``APIRouter`` over the shared dependencies of :mod:`.deps` and the pure translations of
:mod:`.ollama_wire`. Every failure is Ollama's ``{"error": "..."}`` with a 4xx/5xx status, from
:func:`error_response`. Streams are NDJSON (``application/x-ndjson``), on by default; an error
after the stream began is one ``{"error": ...}`` line. Durations are nanoseconds, measured here
around the request's phases (``load_duration`` is the manager's own load time when this request
waited for the load); token counts are the runtime's. Chat goes through the same
:class:`~rkllm_core.chat.engine.ChatEngine` as ``/v1/chat/completions``, so a client that resends
the history continues the conversation in the KV cache (``X-RKLLM-KV-Reused`` says so, on a stream
too).

``GET /``, ``HEAD /`` and ``GET /api/version`` need no API key (they say that the server runs and
its version, nothing else); every other route takes the same Bearer key as ``/v1/*``.

A generation the server's shutdown cuts short ends its stream with one line
``{"error": "the server is shutting down; the request was aborted"}`` (what Ollama's clients raise
as an error); a whole response cut this way is a 503.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from .. import __version__
from ..chat.engine import ChatDone, ReasoningDelta, TextDelta, ToolCallDelta
from ..errors import RKLLMError
from ..hub import PullProgress, parse_ref
from ..hub.store import find_pulled
from ..models.registry import ModelInfo
from . import ollama_wire as ow
from .admission import Place
from .deps import (
    JsonBody,
    Note,
    RequestNote,
    ServerState,
    ShutdownError,
    State,
    metered,
    problem_of,
    protocol_route,
    require_api_key,
)
from .pulls import PullJob
from .wire import WireError

__all__ = ["PREFIX", "error_response", "router"]

PREFIX = "/api"
"""Where this protocol's routes live (unknown paths under it get Ollama's error shape too)."""

_NDJSON = "application/x-ndjson"
_NEVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
_T = TypeVar("_T")
_SHUTDOWN = "the server is shutting down; the request was aborted"


def error_response(exc: Exception) -> JSONResponse:
    """Ollama's ``{"error": "..."}``, with the status and headers :func:`~.deps.problem_of` gives ``exc``."""
    p = problem_of(exc)
    return JSONResponse({"error": p.message}, status_code=p.status, headers=dict(p.headers) or None)


router = APIRouter(route_class=protocol_route(error_response))
_api = APIRouter(route_class=protocol_route(error_response), dependencies=[Depends(require_api_key)])


# -- names: a model may be named the way it was pulled -----------------------------------------------------------


def _by_reference(state: ServerState, body: Any) -> Any:
    """``body`` with a pulled model's reference (``hf.co/OWNER/REPO[:latest]``) replaced by its registry name.

    Ollama's clients name a model the way they pulled it. Only the manifests of models pulled into
    this server's model directories are read; any other name goes on as it is (a path is refused later).
    """
    if not isinstance(body, dict):
        return body
    key = "model" if "model" in body else "name"
    name = body.get(key)
    if not isinstance(name, str) or "/" not in name:
        return body
    try:
        ref = parse_ref(name)
    except RKLLMError:
        return body
    registry = state.manager.registry
    for directory in registry.model_dirs:
        for folder, manifest in find_pulled(directory, ref):
            return {**body, key: registry.get(folder / manifest.model).name}
    return body


async def _named_body(body: JsonBody, state: State) -> Any:
    return _by_reference(state, body)


NamedBody = Annotated[Any, Depends(_named_body)]
"""A request body whose model may be named by the reference it was pulled with."""


# -- keep_alive: how long a model stays loaded unused after a request --------------------------------------------


def _keep(state: ServerState, name: str, keep_alive: float | None) -> None:
    """Apply a request's ``keep_alive`` to ``name`` (absent: the server's ``--keep-alive``), as Ollama does."""
    manager = state.manager
    manager.keep_alive(name, manager.default_keep_alive if keep_alive is None else keep_alive)


def _until(state: ServerState, name: str) -> datetime:
    when = state.manager.expires_at(name)
    return _NEVER if when is None else datetime.fromtimestamp(when, UTC)


# -- measuring ------------------------------------------------------------------------------------------------


def _now() -> str:
    return ow.rfc3339(datetime.now(UTC))


def _modified(info: ModelInfo) -> datetime:
    try:
        return datetime.fromtimestamp(info.path.stat().st_mtime, UTC)
    except OSError:
        return datetime.fromtimestamp(0, UTC)


def _load_orders(state: ServerState, name: str) -> frozenset[int]:
    return frozenset(e.load_order for e in state.manager.loaded() if e.info.name == name)


@dataclass(slots=True)
class _Clock:
    """A request's phases (``perf_counter_ns``): arrival, run start, first token, end; and the load it waited for.

    The run starts when the engine has the model and its plan (:meth:`started`, the engine's
    ``on_start``), so the prompt's evaluation is timed from there to the first token, and the wait
    for the model's turn counts in the total only.
    """

    state: ServerState
    model: str
    start: int
    before: frozenset[int]
    run: int | None = None
    first: int | None = None
    load_ns: int = 0
    kv_reused: bool = False

    @classmethod
    def begin(cls, state: ServerState, model: str) -> _Clock:
        name = state.manager.resolve(model).name
        return cls(state, name, time.perf_counter_ns(), _load_orders(state, name))

    def ready(self) -> None:
        """The model is leased: if an instance appeared since arrival, this request waited for its load."""
        for e in self.state.manager.loaded():
            if e.info.name == self.model and e.load_order not in self.before and not e.loading:
                self.load_ns = int(e.load_time_s * 1e9)

    def started(self, kv_reused: bool) -> None:
        """The engine's ``on_start``: the model is leased and the request planned; the run begins."""
        self.run = time.perf_counter_ns()
        self.kv_reused = kv_reused
        self.ready()

    def timings(self) -> ow.Timings:
        end = time.perf_counter_ns()
        first = self.first if self.first is not None else end
        run = self.run if self.run is not None else self.start + self.load_ns
        return ow.Timings(total=end - self.start, load=self.load_ns, prompt_eval=max(0, first - run), eval=end - first)

    async def watch(self, events: AsyncGenerator[_T, None]) -> AsyncGenerator[_T, None]:
        """``events``, noting when the first one that carries output (or the end) arrives."""
        try:
            async for event in events:
                if self.first is None and isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta | ChatDone):
                    self.first = time.perf_counter_ns()
                yield event
        finally:
            await events.aclose()


async def _in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a blocking manager call on a thread of its own, awaiting it without the loop's executor."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="rkllm-ollama-unload", daemon=True).start()
    return await future


# -- open routes ------------------------------------------------------------------------------------------------


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> Response:
    """``Ollama is running``: what Ollama's clients probe before anything else."""
    return PlainTextResponse("Ollama is running")


@router.get(PREFIX + "/version")
async def version() -> Response:
    """The package version, dotted integers (Open WebUI parses it)."""
    return JSONResponse({"version": __version__})


# -- models ------------------------------------------------------------------------------------------------------


@_api.get(PREFIX + "/tags")
async def tags(state: State) -> Response:
    """Every model the registry lists, as ``name:latest``."""
    infos = state.manager.registry.models()
    return JSONResponse(ow.tags_response([(info, _modified(info)) for info in infos]))


@_api.post(PREFIX + "/show")
async def show(body: NamedBody, state: State, note: Note) -> Response:
    """One model's details, ``model_info`` (with ``<family>.context_length``) and capabilities."""
    note.model = ow.show_request(body)
    info = state.manager.resolve(note.model)
    return JSONResponse(ow.show_response(info, _modified(info)))


@_api.get(PREFIX + "/ps")
async def ps(state: State) -> Response:
    """The loaded models, their memory, and until when their last request asked them to stay."""
    loaded = [
        (e.info, e.memory_mb, _modified(e.info), _until(state, e.info.name))
        for e in state.manager.loaded()
        if not e.loading
    ]
    return JSONResponse(ow.ps_response(loaded))


# -- chat and generate -------------------------------------------------------------------------------------------


@_api.post(PREFIX + "/chat")
async def chat(body: NamedBody, state: State, note: Note) -> Response:
    """A chat turn, streamed as NDJSON (the default) or whole; no messages loads or unloads the model."""
    req = ow.chat_request(body, max_tokens_limit=state.settings.max_tokens, images=state.settings.images)
    if len(req.messages) > state.settings.max_messages:
        raise WireError(f"more than {state.settings.max_messages} messages", "messages")
    return await _answer(state, note, req, chat=True)


@_api.post(PREFIX + "/generate")
async def generate(body: NamedBody, state: State, note: Note) -> Response:
    """A completion of ``prompt`` (through the chat template); an empty prompt loads or unloads the model."""
    req = ow.generate_request(body, max_tokens_limit=state.settings.max_tokens, images=state.settings.images)
    return await _answer(state, note, req, chat=False)


async def _answer(
    state: ServerState, note: RequestNote, req: ow.ChatRequest | ow.GenerateRequest, *, chat: bool
) -> Response:
    note.model = req.model
    name = state.manager.resolve(req.model).name
    if not req.messages:
        return await _load_or_unload(state, name, req.keep_alive, chat=chat)
    place = state.admit(name)
    cfg = state.settings
    options = req.options if req.options.timeout is not None else replace(req.options, timeout=cfg.queue_timeout)
    clock = _Clock.begin(state, name)
    engine_events = state.chat.astream(name, req.messages, options, on_start=clock.started)
    metered_events = metered(engine_events, state.metrics, place.release, note)
    answer = _Answer(
        events=clock.watch(state.stopping.until_abort(metered_events)),
        place=place,
        clock=clock,
        name=name,
        keep_alive=req.keep_alive,
        state=state,
        created=_now(),
        chat=chat,
    )
    return await (answer.streamed() if req.stream else answer.whole())


@dataclass
class _Answer:
    """One answer's events on their way out, whole or as NDJSON lines."""

    events: AsyncGenerator[object, None]
    place: Place
    clock: _Clock
    name: str
    keep_alive: float | None
    state: ServerState
    created: str
    chat: bool

    def final(self, done: ChatDone, *, whole: bool) -> dict[str, Any]:
        _keep(self.state, self.name, self.keep_alive)
        final = ow.chat_response if self.chat else ow.generate_response
        return final(done, self.created, self.clock.timings(), whole=whole)

    async def whole(self) -> Response:
        try:
            done = None
            async for event in self.events:
                if isinstance(event, ChatDone):
                    done = event
        finally:
            await self.events.aclose()
            self.place.release()
        if done is None:
            raise ShutdownError(_SHUTDOWN)
        headers = {**_kv_header(done.kv_reused), "X-RKLLM-Sampling-Policy": done.sampling_policy}
        return JSONResponse(self.final(done, whole=True), headers=headers)

    async def streamed(self) -> Response:
        try:
            first = await self.events.__anext__()
        except StopAsyncIteration:  # aborted by the shutdown before the first event
            await self.events.aclose()
            self.place.release()
            raise ShutdownError(_SHUTDOWN) from None
        except BaseException:
            await self.events.aclose()
            self.place.release()
            raise
        headers = {"Cache-Control": "no-cache", **_kv_header(self.clock.kv_reused)}  # known once the first event is in
        return StreamingResponse(
            self.lines(first), media_type=_NDJSON, headers=headers, background=BackgroundTask(self.place.release)
        )

    async def lines(self, event: object) -> AsyncIterator[bytes]:
        chunk = ow.chat_chunk if self.chat else ow.generate_chunk
        try:
            while True:
                if isinstance(event, ChatDone):
                    yield _line(self.final(event, whole=False))
                    return
                out = chunk(event, self.name, self.created)
                if out is not None:
                    yield _line(out)
                try:
                    event = await self.events.__anext__()
                except StopAsyncIteration:  # cut by the server's shutdown
                    yield _line({"error": _SHUTDOWN})
                    return
                except RKLLMError as exc:  # after the headers: one error line, as Ollama does
                    yield _line({"error": str(exc)})
                    return
        finally:
            await self.events.aclose()


def _kv_header(reused: bool) -> dict[str, str]:
    return {"X-RKLLM-KV-Reused": "true" if reused else "false"}


# -- pull: a model from the Hugging Face Hub, as rkllm pull does it ---------------------------------------------


@_api.post(PREFIX + "/pull")
async def pull_model(body: JsonBody, state: State, note: Note) -> Response:
    """Pull ``model`` (a Hugging Face reference) into the first model directory; progress as NDJSON.

    A name this server already has is pulled at once (nothing to download). The pulled model is then
    listed by ``/api/tags`` under its friendly name.
    """
    req = ow.pull_request(body)
    note.model = req.model
    registry = state.manager.registry
    if "/" not in req.model:  # a name, not a reference: the server has it, or it is not on any Hub
        state.manager.resolve(ow.model_name({"model": req.model}))
        done: AsyncGenerator[PullProgress, None] | None = None
    else:
        job = PullJob(req.model, registry.model_dirs[0])
        done = state.stopping.until_abort(job.events())
    if not req.stream:
        if done is not None:
            async for _ in done:
                pass
            _pulled(state)
        return JSONResponse(ow.pull_status("success"))
    return StreamingResponse(_pull_lines(state, done), media_type=_NDJSON)


async def _pull_lines(state: ServerState, events: AsyncGenerator[PullProgress, None] | None) -> AsyncIterator[bytes]:
    if events is not None:
        try:
            async for step in events:
                yield _line(ow.pull_status(step.status, step.file, step.total, step.completed))
        except RKLLMError as exc:  # after the headers: one error line, as Ollama does
            yield _line({"error": str(exc)})
            return
        finally:
            await events.aclose()
        if state.stopping.aborted:
            yield _line({"error": _SHUTDOWN})
            return
        _pulled(state)
    yield _line(ow.pull_status("success"))


def _pulled(state: ServerState) -> None:
    state.manager.registry.refresh(force=True)  # list the new model at once


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


async def _load_or_unload(state: ServerState, name: str, keep_alive: float | None, *, chat: bool) -> Response:
    """An empty prompt: load ``name`` (``done_reason: "load"``), or with ``keep_alive: 0`` unload it."""
    cfg = state.settings
    if keep_alive == 0:
        await _in_thread(state.manager.unload, name, timeout=cfg.queue_timeout)
        return JSONResponse(ow.load_response(name, _now(), "unload", chat=chat))
    with state.admit(name):
        async with state.manager.alease(name, timeout=cfg.queue_timeout):
            pass
    _keep(state, name, keep_alive)
    return JSONResponse(ow.load_response(name, _now(), "load", chat=chat))


# -- embeddings --------------------------------------------------------------------------------------------------


@_api.post(PREFIX + "/embed")
async def embed(body: NamedBody, state: State, note: Note) -> Response:
    """Embeddings of one text or a list (``truncate`` defaults to true)."""
    req = ow.embed_request(body)
    note.model = req.model
    clock = _Clock.begin(state, req.model)
    with state.admit(req.model):
        result = await state.embed.aembed(
            req.model, req.texts, truncate=req.truncate, timeout=state.settings.queue_timeout
        )
    clock.ready()
    state.metrics.record_tokens(result.model, "embedded", result.input_tokens)
    note.prompt_tokens = result.input_tokens
    return JSONResponse(ow.embed_response(result.vectors, result.model, result.input_tokens, clock.timings()))


@_api.post(PREFIX + "/embeddings")
async def embeddings(body: NamedBody, state: State, note: Note) -> Response:
    """The older single-text endpoint: ``{"embedding": [...]}``."""
    req = ow.embeddings_request(body)
    note.model = req.model
    with state.admit(req.model):
        result = await state.embed.aembed(req.model, req.texts, timeout=state.settings.queue_timeout)
    state.metrics.record_tokens(result.model, "embedded", result.input_tokens)
    note.prompt_tokens = result.input_tokens
    return JSONResponse({"embedding": result.vectors[0]})


router.include_router(_api)
