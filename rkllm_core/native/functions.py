"""The runtime's exported functions, with the prototypes of one ABI attached.

Nothing here loads a library at import time. :func:`bind` attaches the
prototypes of one ABI to an already loaded ``ctypes.CDLL``.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char_p, c_int, c_void_p
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import abi12, abi13
from .structs import LLMHandle, RKLLMCrossAttnParam, RKLLMLoraAdapter

SUPPORTED_ABIS = ("1.2", "1.3")

_MODULES: dict[str, ModuleType] = {"1.2": abi12, "1.3": abi13}


def abi_module(abi: str) -> ModuleType:
    """Return the module holding the ABI-specific types of ``abi`` ("1.2" or "1.3")."""
    return _MODULES[abi]


@dataclass(frozen=True, slots=True)
class RuntimeFunctions:
    """The exported functions of one loaded runtime, with prototypes attached.

    Each attribute is the ctypes function itself; the C prototype is in the
    comment of :func:`_prototypes` above its entry.
    """

    abi: str
    rkllm_createDefaultParam: Any
    rkllm_init: Any
    rkllm_load_lora: Any
    rkllm_load_prompt_cache: Any
    rkllm_release_prompt_cache: Any
    rkllm_destroy: Any
    rkllm_run: Any
    rkllm_run_async: Any
    rkllm_abort: Any
    rkllm_is_running: Any
    rkllm_clear_kv_cache: Any
    rkllm_get_kv_cache_size: Any
    rkllm_set_chat_template: Any
    rkllm_set_function_tools: Any
    rkllm_set_cross_attn_params: Any | None


def bind(lib: ctypes.CDLL, abi: str) -> RuntimeFunctions:
    """Attach the prototypes of ``abi`` to the functions exported by ``lib``.

    Args:
        lib: the loaded runtime library.
        abi: "1.2" or "1.3".

    Returns:
        The bound functions.

    Raises:
        AttributeError: a required symbol is missing from ``lib``.
    """
    bound: dict[str, Any] = {}
    for name, (restype, *argtypes) in _prototypes(_MODULES[abi]).items():
        if name in _OPTIONAL_SYMBOLS and not hasattr(lib, name):
            bound[name] = None
            continue
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
        bound[name] = fn
    return RuntimeFunctions(abi=abi, **bound)


# Symbols bound when the library exports them (``None`` otherwise).
_OPTIONAL_SYMBOLS = frozenset({"rkllm_set_cross_attn_params"})


def _prototypes(m: ModuleType) -> dict[str, tuple[Any, ...]]:
    """The C prototypes of the ABI whose types ``m`` holds: name -> (restype, *argtypes)."""
    P_Param = POINTER(m.RKLLMParam)
    P_Input = POINTER(m.RKLLMInput)
    P_Infer = POINTER(m.RKLLMInferParam)
    P_int = POINTER(c_int)
    return {
        # RKLLMParam rkllm_createDefaultParam();
        "rkllm_createDefaultParam": (m.RKLLMParam,),
        # 1.2: int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
        # 1.3: int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
        "rkllm_init": (c_int, POINTER(LLMHandle), P_Param, m.INIT_CALLBACK_ARGTYPE),
        # int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
        "rkllm_load_lora": (c_int, LLMHandle, POINTER(RKLLMLoraAdapter)),
        # int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
        "rkllm_load_prompt_cache": (c_int, LLMHandle, c_char_p),
        # int rkllm_release_prompt_cache(LLMHandle handle);
        "rkllm_release_prompt_cache": (c_int, LLMHandle),
        # int rkllm_destroy(LLMHandle handle);
        "rkllm_destroy": (c_int, LLMHandle),
        # int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input,
        #               RKLLMInferParam* rkllm_infer_params, void* userdata);
        "rkllm_run": (c_int, LLMHandle, P_Input, P_Infer, c_void_p),
        # int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input,
        #                     RKLLMInferParam* rkllm_infer_params, void* userdata);
        "rkllm_run_async": (c_int, LLMHandle, P_Input, P_Infer, c_void_p),
        # int rkllm_abort(LLMHandle handle);
        "rkllm_abort": (c_int, LLMHandle),
        # int rkllm_is_running(LLMHandle handle);
        "rkllm_is_running": (c_int, LLMHandle),
        # int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos, int* end_pos);
        "rkllm_clear_kv_cache": (c_int, LLMHandle, c_int, P_int, P_int),
        # int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);
        "rkllm_get_kv_cache_size": (c_int, LLMHandle, P_int),
        # int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt,
        #                             const char* prompt_prefix, const char* prompt_postfix);
        "rkllm_set_chat_template": (c_int, LLMHandle, c_char_p, c_char_p, c_char_p),
        # int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt,
        #                              const char* tools, const char* tool_response_str);
        "rkllm_set_function_tools": (c_int, LLMHandle, c_char_p, c_char_p, c_char_p),
        # int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);
        "rkllm_set_cross_attn_params": (c_int, LLMHandle, POINTER(RKLLMCrossAttnParam)),
    }


# Symbols every supported runtime exports; `rkllm_set_function_tools` and
# `rkllm_get_kv_cache_size` first appeared in 1.2.1, so their absence marks a
# runtime <= 1.2.0 (unsupported: different callback and clear_kv_cache ABI).
REQUIRED_SYMBOLS = (
    "rkllm_createDefaultParam",
    "rkllm_init",
    "rkllm_run",
    "rkllm_abort",
    "rkllm_destroy",
    "rkllm_clear_kv_cache",
    "rkllm_set_chat_template",
)
SYMBOLS_SINCE_1_2_1 = ("rkllm_set_function_tools", "rkllm_get_kv_cache_size")

__all__ = [
    "REQUIRED_SYMBOLS",
    "SUPPORTED_ABIS",
    "SYMBOLS_SINCE_1_2_1",
    "RuntimeFunctions",
    "abi_module",
    "bind",
]
