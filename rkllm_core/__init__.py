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
    "ModelNotFoundError": "errors",
    "NativeError": "errors",
    "NoModelsFoundError": "errors",
    "RunError": "errors",
    "UnsupportedRuntimeError": "errors",
    # types
    "InitParams": "types",
    "PerfStats": "types",
    "SamplingParams": "types",
    "StreamChunk": "types",
    # runtime
    "Completion": "runtime",
    "RKLLMRuntime": "runtime",
    "RunStream": "runtime",
    # library
    "RuntimeLibrary": "library",
    "find_library": "library",
    "load_library": "library",
    # registry and manager
    "ModelInfo": "registry",
    "ModelRegistry": "registry",
    "ModelManager": "manager",
    "default_manager": "manager",
    # chat
    "ChatEngine": "engine",
    "ChatResponse": "engine",
    "shared_engine": "engine",
    "ChatMessage": "messages",
    "ChatOptions": "messages",
    "ToolCallRequest": "messages",
    "PromptCacheStore": "promptcache",
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
    "HandleClosedError",
    "InitError",
    "InitParams",
    "InvalidParameterError",
    "LibraryNotFoundError",
    "ModelFileError",
    "ModelInfo",
    "ModelManager",
    "ModelNotFoundError",
    "ModelRegistry",
    "NativeError",
    "NoModelsFoundError",
    "PerfStats",
    "PromptCacheStore",
    "RKLLMError",
    "RKLLMRuntime",
    "RunError",
    "RunStream",
    "RuntimeLibrary",
    "SamplingParams",
    "StreamChunk",
    "ToolCallRequest",
    "UnsupportedRuntimeError",
    "default_manager",
    "find_library",
    "load_library",
    "shared_engine",
    "__version__",
]

if TYPE_CHECKING:
    from .engine import ChatEngine, ChatResponse, shared_engine
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
        ModelNotFoundError,
        NativeError,
        NoModelsFoundError,
        RKLLMError,
        RunError,
        UnsupportedRuntimeError,
    )
    from .library import RuntimeLibrary, find_library, load_library
    from .manager import ModelManager, default_manager
    from .messages import ChatMessage, ChatOptions, ToolCallRequest
    from .promptcache import PromptCacheStore
    from .registry import ModelInfo, ModelRegistry
    from .runtime import Completion, RKLLMRuntime, RunStream
    from .types import InitParams, PerfStats, SamplingParams, StreamChunk


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rkllm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
