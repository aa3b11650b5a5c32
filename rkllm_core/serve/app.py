"""The HTTP app: the shared state, one router per protocol, ``/health``, ``/metrics``, and the error handlers.

Every request goes through the same model manager as the in-process adapters, so the server has
what they have: KV-cache reuse for clients that resend the history, the prompt cache, swapping
within a budget, honest usage, typed errors. The protocols live in their own modules (OpenAI's in
:mod:`.openai`, Ollama's in :mod:`.ollama`), over the dependencies of :mod:`.deps`; a new protocol is
a router included here and its prefix listed in ``_PROTOCOLS``, so that unknown paths under it get
its error shape too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..errors import RKLLMError
from ..models.manager import ModelManager
from . import ollama, openai
from .deps import AuthError, ServerSettings, ServerState, StampMiddleware, authorized, require_api_key, server_state

__all__ = ["ServerSettings", "create_app"]

_PROTOCOLS: tuple[tuple[str, Callable[[Exception], Response]], ...] = (
    (openai.PREFIX, openai.error_response),
    (ollama.PREFIX, ollama.error_response),
)
"""Each protocol's path prefix and error shape. Paths under none (``/metrics``) answer as OpenAI does."""


def create_app(manager: ModelManager, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving ``manager``'s models (the caller closes the manager).

    Args:
        manager: where models come from.
        settings: limits and identity (defaults: :class:`ServerSettings`).
    """
    state = ServerState(manager, settings or ServerSettings())
    app = FastAPI(title="rkllm serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rkllm = state
    app.add_middleware(StampMiddleware, state=state)
    app.add_exception_handler(HTTPException, _unrouted)
    app.add_exception_handler(RKLLMError, _failed)
    app.include_router(openai.router)
    app.include_router(ollama.router)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        loaded = sorted(e.info.name for e in manager.loaded())
        return {"status": "ok", "board": state.board, "loaded": loaded, "requests": state.active}

    @app.get("/metrics", dependencies=[Depends(require_api_key)])
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _error_response(path: str) -> Callable[[Exception], Response]:
    for prefix, error_response in _PROTOCOLS:
        if path == prefix or path.startswith(prefix + "/"):
            return error_response
    return openai.error_response


async def _unrouted(request: Request, exc: Exception) -> Response:
    """An unknown path or method: 401 without the key (as for any path but ``/health``), else 404 / 405."""
    open_path = request.url.path == "/health"
    if not open_path and not authorized(server_state(request).settings, request.headers.get("authorization")):
        exc = AuthError("a valid API key is required (Authorization: Bearer ...)")
    elif isinstance(exc, HTTPException) and exc.status_code in (404, 405):
        what = "no such endpoint" if exc.status_code == 404 else "method not allowed"
        exc = HTTPException(exc.status_code, f"{what}: {request.method} {request.url.path}", exc.headers)
    return _error_response(request.url.path)(exc)


async def _failed(request: Request, exc: Exception) -> Response:
    """A failure in a route of the app's own (a protocol's router answers its own failures)."""
    return _error_response(request.url.path)(exc)
