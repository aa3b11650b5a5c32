"""rkllm_core: run LLMs on the Rockchip NPU (RKLLM runtime) from Python.

Importing this package loads no native library and imports no framework;
``librkllmrt.so`` is loaded on first use. The public names are imported
lazily, so ``import rkllm_core`` stays cheap.

Quick start::

    from rkllm_core import RKLLMRuntime
    with RKLLMRuntime("Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm") as rt:
        for chunk in rt.stream("Hello!"):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "RKLLMError": "errors",
    "ABIError": "errors",
    "BusyError": "errors",
    "CacheError": "errors",
    "ContextLengthError": "errors",
    "HandleClosedError": "errors",
    "InitError": "errors",
    "InvalidParameterError": "errors",
    "LibraryNotFoundError": "errors",
    "ModelFileError": "errors",
    "ModelKindError": "errors",
    "ModelNotFoundError": "errors",
    "NativeError": "errors",
    "NoModelsFoundError": "errors",
    "PreflightError": "errors",
    "RunError": "errors",
    "UnsupportedRuntimeError": "errors",
    # types
    "InitParams": "params",
    "PerfStats": "params",
    "SamplingParams": "params",
    "StreamChunk": "params",
    # runtime
    "Completion": "runtime",
    "RKLLMRuntime": "runtime",
    "RunStream": "runtime",
    "Session": "runtime",
    "KVState": "runtime",
    # library
    "RuntimeLibrary": "native.library",
    "find_library": "native.library",
    "load_library": "native.library",
    # registry and manager
    "ModelInfo": "models.registry",
    "ModelKind": "filenames",
    "ModelRegistry": "models.registry",
    "ModelManager": "models.manager",
    "default_manager": "models.manager",
    "manager_for": "models.manager",
    "set_default_manager": "models.manager",
    "Lease": "models.manager",
    "LoadEvent": "models.manager",
    # chat
    "ChatEngine": "chat.engine",
    "ChatResponse": "chat.engine",
    "ChatMessage": "chat.messages",
    "ChatOptions": "chat.options",
    "ToolCallRequest": "chat.messages",
    "PromptCacheStore": "chat.promptcache",
    # embeddings
    "EmbeddingEngine": "embed.engine",
    "EmbeddingResult": "embed.engine",
    "RerankResult": "embed.engine",
    "Tensor": "params",
}

__all__ = [
    "ABIError",
    "BusyError",
    "CacheError",
    "ChatEngine",
    "ChatMessage",
    "ChatOptions",
    "ChatResponse",
    "Completion",
    "ContextLengthError",
    "EmbeddingEngine",
    "EmbeddingResult",
    "HandleClosedError",
    "InitError",
    "InitParams",
    "InvalidParameterError",
    "KVState",
    "Lease",
    "LoadEvent",
    "LibraryNotFoundError",
    "ModelFileError",
    "ModelInfo",
    "ModelKind",
    "ModelKindError",
    "ModelManager",
    "ModelNotFoundError",
    "ModelRegistry",
    "NativeError",
    "NoModelsFoundError",
    "PerfStats",
    "PreflightError",
    "PromptCacheStore",
    "RKLLMError",
    "RerankResult",
    "RKLLMRuntime",
    "RunError",
    "RunStream",
    "Session",
    "RuntimeLibrary",
    "SamplingParams",
    "StreamChunk",
    "Tensor",
    "ToolCallRequest",
    "UnsupportedRuntimeError",
    "default_manager",
    "find_library",
    "load_library",
    "manager_for",
    "set_default_manager",
    "__version__",
]

if TYPE_CHECKING:
    from .chat.engine import ChatEngine, ChatResponse
    from .chat.messages import ChatMessage, ToolCallRequest
    from .chat.options import ChatOptions
    from .chat.promptcache import PromptCacheStore
    from .embed.engine import EmbeddingEngine, EmbeddingResult, RerankResult
    from .errors import (
        ABIError,
        BusyError,
        CacheError,
        ContextLengthError,
        HandleClosedError,
        InitError,
        InvalidParameterError,
        LibraryNotFoundError,
        ModelFileError,
        ModelKindError,
        ModelNotFoundError,
        NativeError,
        NoModelsFoundError,
        PreflightError,
        RKLLMError,
        RunError,
        UnsupportedRuntimeError,
    )
    from .filenames import ModelKind
    from .models.manager import Lease, LoadEvent, ModelManager, default_manager, manager_for, set_default_manager
    from .models.registry import ModelInfo, ModelRegistry
    from .native.library import RuntimeLibrary, find_library, load_library
    from .params import InitParams, PerfStats, SamplingParams, StreamChunk, Tensor
    from .runtime import Completion, KVState, RKLLMRuntime, RunStream, Session


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rkllm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
