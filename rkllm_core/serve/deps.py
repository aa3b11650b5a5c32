"""What every protocol's routes share: state, auth, the body limit, the admission line, metrics, errors.

Also the server's life: :class:`Stopping` (every generation runs through its
:meth:`~Stopping.until_abort`, so a shutdown can end it with a clean end of its response), and
the request log (:class:`StampMiddleware` writes one line per request; a route fills the request's
:class:`RequestNote` with the model and the tokens).

A protocol (OpenAI's in :mod:`.openai`) is one ``APIRouter`` whose route class is
:func:`protocol_route` over the protocol's own ``error_response``, whose routes depend on
:func:`require_api_key`, and whose endpoints take :data:`State` and :data:`JsonBody` through
``Depends``. Endpoints raise; nothing in them builds an error response. :func:`problem_of` decides
what a failure means over HTTP (status, message, field), once for every protocol; each protocol
only renders that :class:`Problem` in its own shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..chat.engine import ChatDone, ChatEngine, ReasoningDelta, TextDelta, ToolCallDelta
from ..embed import EmbeddingEngine
from ..errors import (
    AmbiguousModelFileError,
    BusyError,
    ContextLengthError,
    InvalidParameterError,
    ModelKindError,
    ModelNotFoundError,
    PullError,
    RKLLMError,
)
from ..models.manager import ModelManager
from .admission import AdmissionLine, Place
from .metrics import ServerMetrics
from .wire import WireError
from .wire_images import DEFAULT_MAX_IMAGE_BYTES, ImagePolicy, body_limit_for

__all__ = [
    "ACCESS_LOGGER",
    "AuthError",
    "BodyTooLargeError",
    "JsonBody",
    "Note",
    "Problem",
    "RequestNote",
    "ServerSettings",
    "ServerState",
    "ShutdownError",
    "State",
    "StampMiddleware",
    "Stopping",
    "authorized",
    "json_body",
    "metered",
    "problem_of",
    "protocol_route",
    "require_api_key",
    "request_note",
    "server_state",
]

logger = logging.getLogger(__name__)

ACCESS_LOGGER = "rkllm_core.serve.access"
"""The logger of the one-line-per-request access log (``rkllm serve`` prints it unless ``--no-access-log``)."""
access_logger = logging.getLogger(ACCESS_LOGGER)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits and identity of one server.

    Attributes:
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``.
        board: the name this server reports in ``X-RKLLM-Board`` (default: the host name).
        max_body_bytes: larger request bodies get 413 (default about 25 MiB: room for an image of the
            default ``max_image_bytes`` in base64, with its conversation).
        max_messages: more messages in one request get 400.
        max_tokens: a larger ``max_tokens`` / ``max_completion_tokens`` gets 400.
        max_waiting: requests one model may have in flight (running or waiting for the NPU) before a
            new one for it gets 429 with ``Retry-After``.
        queue_timeout: seconds a request may wait for its model before 429.
        access_log: log one line per request to :data:`ACCESS_LOGGER` (method, path, model, status,
            tokens, milliseconds).
        max_image_bytes: the largest image (decoded) a request may send; larger gets 400.
        allow_remote_images: take ``http(s)`` image URLs in requests (fetched by the server, with size
            and time limits); off by default, when such a URL gets 400 naming ``--allow-remote-images``.
    """

    api_key: str | None = None
    board: str = ""
    max_body_bytes: int = body_limit_for(DEFAULT_MAX_IMAGE_BYTES)
    max_messages: int = 512
    max_tokens: int = 8192
    max_waiting: int = 64
    queue_timeout: float = 120.0
    access_log: bool = True
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    allow_remote_images: bool = False

    @property
    def images(self) -> ImagePolicy:
        """What requests may send as images."""
        return ImagePolicy(max_bytes=self.max_image_bytes, allow_remote=self.allow_remote_images)


class Stopping:
    """The server's way out: first it drains (in-flight requests go on), then it may abort them.

    :meth:`abort` runs on the event loop (a signal handler schedules it there). Every generation
    runs through :meth:`until_abort`, so an abort ends each one at once with a clean end of its
    response, and a request still waiting for its model leaves the line.
    """

    def __init__(self) -> None:
        self._aborted = asyncio.Event()

    @property
    def aborted(self) -> bool:
        """Whether in-flight requests were told to end."""
        return self._aborted.is_set()

    def abort(self) -> None:
        """End every generation in flight now (call on the event loop)."""
        self._aborted.set()

    async def until_abort(self, events: AsyncGenerator[_T, None]) -> AsyncGenerator[_T, None]:
        """``events`` until they end or :meth:`abort` is called; then ``events`` is closed (its run aborted).

        A stream cut this way simply ends early: for a chat, without its
        :class:`~rkllm_core.chat.engine.ChatDone`, which is how its consumer knows.
        """
        stop = asyncio.ensure_future(self._aborted.wait())
        step: asyncio.Future[_T] | None = None
        try:
            while not stop.done():
                step = asyncio.ensure_future(events.__anext__())
                await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    break
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield event
        finally:
            stop.cancel()
            if step is not None and not step.done():
                step.cancel()  # the engine aborts its run and leaves every line it stood in
                await asyncio.wait((step,))  # its end, without raising it (a cancel of ours still does)
                if not step.cancelled():
                    step.exception()  # retrieved: the stream is over either way
            await events.aclose()


class ShutdownError(RKLLMError):
    """A request cut short because the server is shutting down (503)."""


class ServerState:
    """Everything a request needs, built once per app and kept in ``app.state.rkllm``.

    Attributes:
        manager: where models come from (the caller of :func:`~.app.create_app` closes it).
        settings: the server's limits and identity.
        board: the name in ``X-RKLLM-Board``.
        chat: the chat engine over ``manager``.
        embed: the embedding and rerank engine over ``manager``.
        metrics: the app's Prometheus metrics.
        line: the per-model admission line (``settings.max_waiting`` places each).
        stopping: the shutdown's abort switch (see :class:`Stopping`).
        active: HTTP requests in progress (counted by :class:`StampMiddleware`).
    """

    def __init__(self, manager: ModelManager, settings: ServerSettings) -> None:
        self.manager = manager
        self.settings = settings
        self.board = settings.board or socket.gethostname()
        self.chat = ChatEngine(manager)
        self.embed = EmbeddingEngine(manager)
        self.metrics = ServerMetrics(manager)
        self.line = AdmissionLine(settings.max_waiting)
        self.stopping = Stopping()
        self.active = 0

    def admit(self, model: str) -> Place:
        """A place in ``model``'s line, under its resolved name (so its aliases share one line).

        Raises:
            ModelNotFoundError: no such model.
            BusyError: the model already has ``max_waiting`` requests in flight.
        """
        return self.line.enter(self.manager.resolve(model).name)


def server_state(request: Request) -> ServerState:
    """The dependency giving a route its app's :class:`ServerState`."""
    state: ServerState = request.app.state.rkllm
    return state


State = Annotated[ServerState, Depends(server_state)]
"""A route parameter of this type receives the app's :class:`ServerState`."""


@dataclass(slots=True)
class RequestNote:
    """What a route tells the access log about its request (the model, the tokens).

    Attributes:
        model: the model asked for, once the body is read.
        prompt_tokens: tokens read (prompt, embedded or reranked), once known.
        completion_tokens: tokens generated, once known.
    """

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def tokens(self) -> str:
        """``prompt+completion`` (``-`` for what is not known)."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return "-"
        return f"{self.prompt_tokens if self.prompt_tokens is not None else '-'}+{self.completion_tokens or 0}"


_NOTE_KEY = "rkllm_note"


def request_note(request: Request) -> RequestNote:
    """The dependency giving a route its request's :class:`RequestNote` (one per request)."""
    state = request.scope.setdefault("state", {})
    note = state.get(_NOTE_KEY)
    if not isinstance(note, RequestNote):
        note = state[_NOTE_KEY] = RequestNote()
    return note


Note = Annotated[RequestNote, Depends(request_note)]
"""A route parameter of this type receives the request's :class:`RequestNote`."""


# -- auth and the body ---------------------------------------------------------------------------------------


class AuthError(RKLLMError, PermissionError):
    """A request without this server's API key (401)."""


class BodyTooLargeError(InvalidParameterError):
    """A request body above ``max_body_bytes`` (413)."""


def authorized(settings: ServerSettings, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header value carries the key (compared in constant time)."""
    if settings.api_key is None:
        return True
    expected = f"Bearer {settings.api_key}".encode()
    return hmac.compare_digest((authorization or "").encode(), expected)


def require_api_key(request: Request, state: State) -> None:
    """The dependency refusing a request without the API key, when the server has one.

    Raises:
        AuthError: a missing or wrong key.
    """
    if not authorized(state.settings, request.headers.get("authorization")):
        raise AuthError("a valid API key is required (Authorization: Bearer ...)")


async def json_body(request: Request, state: State) -> Any:
    """The dependency reading the body as JSON, never holding more than ``max_body_bytes`` of it.

    Raises:
        BodyTooLargeError: a ``Content-Length`` above the limit, or a body that grows past it.
        InvalidParameterError: the body is not JSON.
    """
    limit = state.settings.max_body_bytes
    too_large = f"the request body is larger than {limit} bytes"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLargeError(too_large)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise BodyTooLargeError(too_large)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"the body is not valid JSON: {exc}") from exc


JsonBody = Annotated[Any, Depends(json_body)]
"""A route parameter of this type receives the request's body, parsed (see :func:`json_body`)."""


# -- errors --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """What a failure means over HTTP, before a protocol gives it its shape.

    Attributes:
        status: the HTTP status.
        message: what went wrong and, where it helps, what to do.
        kind: OpenAI's error ``type`` (``invalid_request_error``, ``rate_limit_error``, ``server_error``).
        param: the offending request field, dotted, when one is to blame.
        code: a stable machine-readable code (``model_not_found``), when there is one.
        headers: response headers the status calls for (``Retry-After``, ``Allow``).
    """

    status: int
    message: str
    kind: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def problem_of(exc: BaseException) -> Problem:
    """The :class:`Problem` for any failure (the process keeps serving after every one)."""
    msg = str(exc)
    if isinstance(exc, AuthError):
        return Problem(401, msg, code="invalid_api_key")
    if isinstance(exc, BodyTooLargeError):
        return Problem(413, msg)
    if isinstance(exc, WireError):
        return Problem(400, msg, param=exc.param)
    if isinstance(exc, ModelNotFoundError):
        return Problem(404, msg, param="model", code="model_not_found")
    if isinstance(exc, ModelKindError):
        return Problem(400, msg, param="model", code="wrong_model_kind")
    if isinstance(exc, ContextLengthError):
        return Problem(400, msg, param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidParameterError):
        return Problem(400, msg)
    if isinstance(exc, BusyError):
        return Problem(429, msg, "rate_limit_error", code=f"busy_{exc.reason}", headers={"Retry-After": "1"})
    if isinstance(exc, RequestValidationError):
        return _invalid(exc)
    if isinstance(exc, AmbiguousModelFileError):
        return Problem(400, msg, param="model", code="ambiguous_model_file")
    if isinstance(exc, PullError):  # the Hub, the network or the disk
        return Problem(502, msg, "server_error", code="pull_failed")
    if isinstance(exc, ShutdownError):
        return Problem(503, msg, "server_error", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, HTTPException):
        return Problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    logger.error("request failed", exc_info=exc)
    return Problem(500, msg, "server_error")


def _invalid(exc: RequestValidationError) -> Problem:
    """FastAPI's 422 for a typed parameter: the first error, its field named as the wire modules name fields."""
    errors = exc.errors()
    if not errors:
        return Problem(422, "the request is not valid")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part not in ("body", "query", "path", "header", "cookie")]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = f"'{param}': {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid"))
    return Problem(422, message, param=param)


def protocol_route(error_response: Callable[[Exception], Response]) -> type[APIRoute]:
    """A route class for one protocol's router, answering its failures in that protocol's shape.

    Args:
        error_response: the protocol's rendering of :func:`problem_of`; it answers any failure
            of the router's routes, in a dependency (the API key, the body) or in the endpoint.
    """

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:  # noqa: BLE001 - every failure becomes the protocol's error
                    return error_response(exc)

            return handle

    return ProtocolRoute


# -- the request's metrics and headers -----------------------------------------------------------------------


async def metered(
    events: AsyncGenerator[Any, None],
    metrics: ServerMetrics,
    release: Callable[[], None],
    note: RequestNote | None = None,
) -> AsyncGenerator[object, None]:
    """A chat stream's events, recording time to first token and usage; releases the line place at the end.

    Args:
        events: the engine's stream.
        metrics: where time to first token and usage go.
        release: gives the request's place in the admission line back.
        note: the request's note for the access log, given the usage.
    """
    start = time.monotonic()
    ttft: float | None = None
    try:
        async for event in events:
            if ttft is None and isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta):
                ttft = time.monotonic() - start
            if isinstance(event, ChatDone):
                metrics.record_chat(event, ttft)
                if note is not None:
                    note.prompt_tokens = event.usage.input_tokens
                    note.completion_tokens = event.usage.output_tokens
            yield event
    finally:
        release()
        await events.aclose()


class StampMiddleware:
    """Every response says which board answered (``X-RKLLM-Board``), is counted, and logged.

    The count's label is the matched route's own path (``unmatched`` for none), so clients cannot
    invent label values. The requests in progress are counted in ``state.active``; when
    ``settings.access_log`` is on, each one ends with a line on :data:`ACCESS_LOGGER`: client,
    method, path, model, status, tokens (``prompt+completion``) and milliseconds.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call, stamping and counting an HTTP response as it starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.monotonic()
        note = scope.setdefault("state", {}).setdefault(_NOTE_KEY, RequestNote())
        status = 500  # unless a response starts

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-RKLLM-Board"] = self.state.board
                route = getattr(scope.get("route"), "path", "unmatched")
                self.state.metrics.record_request(route, status)
            await send(message)

        self.state.active += 1
        try:
            await self.app(scope, receive, stamped)
        finally:
            self.state.active -= 1
            if self.state.settings.access_log:
                client = scope.get("client")
                access_logger.info(
                    "%s %s %s model=%s %d tokens=%s %.0fms",
                    client[0] if client else "-",
                    scope["method"],
                    scope["path"],
                    note.model or "-",
                    status,
                    note.tokens(),
                    (time.monotonic() - start) * 1000,
                )
