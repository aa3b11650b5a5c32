"""``rkllm serve``: an OpenAI- and Ollama-compatible HTTP server on the same core as the adapters.

Needs the ``server`` extra (FastAPI and uvicorn): ``pip install -e ".[server]"`` in a checkout. Importing
``rkllm_core`` never imports this package, and this package imports FastAPI only when
:func:`create_app` or :class:`ServerSettings` is used (so ``rkllm --help`` works without it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServerSettings", "create_app"]

if TYPE_CHECKING:
    from .app import ServerSettings, create_app


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
