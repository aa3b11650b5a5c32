"""ctypes mirrors of the types that are identical in the 1.2 and 1.3 runtime ABIs.

Names follow Rockchip's ``rkllm.h`` exactly (struct, field and enum names), so
the header can be read side by side with this file. Only ctypes lives here:
nothing in this package hands these objects to callers.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_void_p,
)
from enum import IntEnum

# typedef void* LLMHandle;
LLMHandle = c_void_p


class LLMCallState(IntEnum):
    """``LLMCallState``: the state passed to the result callback."""

    RKLLM_RUN_NORMAL = 0
    RKLLM_RUN_WAITING = 1
    RKLLM_RUN_FINISH = 2
    RKLLM_RUN_ERROR = 3


class RKLLMInputType(IntEnum):
    """``RKLLMInputType``: which member of ``RKLLMInput``'s union is used."""

    RKLLM_INPUT_PROMPT = 0
    RKLLM_INPUT_TOKEN = 1
    RKLLM_INPUT_EMBED = 2
    RKLLM_INPUT_MULTIMODAL = 3


class RKLLMInferMode(IntEnum):
    """``RKLLMInferMode``: what a run produces."""

    RKLLM_INFER_GENERATE = 0
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
    RKLLM_INFER_GET_LOGITS = 2


# C enums are passed as int.
c_enum = c_int


def field_offset(cls: type[ctypes.Structure], name: str) -> int:
    """Return the byte offset of field ``name`` in ``cls``."""
    return int(cls.__dict__[name].offset)


class RKLLMExtendParam(Structure):
    """``RKLLMExtendParam`` (120 bytes on LP64)."""

    base_domain_id: int
    embed_flash: int
    enabled_cpus_num: int
    enabled_cpus_mask: int
    n_batch: int
    use_cross_attn: int
    reserved: ctypes.Array[c_uint8]
    _fields_ = [
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("n_batch", c_uint8),
        ("use_cross_attn", c_int8),
        ("reserved", c_uint8 * 104),
    ]


class RKLLMLoraAdapter(Structure):
    """``RKLLMLoraAdapter``."""

    lora_adapter_path: bytes | None
    lora_adapter_name: bytes | None
    scale: float
    _fields_ = [
        ("lora_adapter_path", c_char_p),
        ("lora_adapter_name", c_char_p),
        ("scale", c_float),
    ]


class RKLLMEmbedInput(Structure):
    """``RKLLMEmbedInput``."""

    embed: ctypes._Pointer[c_float]
    n_tokens: int
    _fields_ = [("embed", POINTER(c_float)), ("n_tokens", c_size_t)]


class RKLLMTokenInput(Structure):
    """``RKLLMTokenInput``."""

    input_ids: ctypes._Pointer[c_int32]
    n_tokens: int
    _fields_ = [("input_ids", POINTER(c_int32)), ("n_tokens", c_size_t)]


class RKLLMLoraParam(Structure):
    """``RKLLMLoraParam``."""

    lora_adapter_name: bytes | None
    _fields_ = [("lora_adapter_name", c_char_p)]


class RKLLMPromptCacheParam(Structure):
    """``RKLLMPromptCacheParam``."""

    save_prompt_cache: int
    prompt_cache_path: bytes | None
    _fields_ = [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)]


class RKLLMCrossAttnParam(Structure):
    """``RKLLMCrossAttnParam``."""

    _fields_ = [
        ("encoder_k_cache", POINTER(c_float)),
        ("encoder_v_cache", POINTER(c_float)),
        ("encoder_mask", POINTER(c_float)),
        ("encoder_pos", POINTER(c_int32)),
        ("num_tokens", c_int),
    ]


class RKLLMResultLastHiddenLayer(Structure):
    """``RKLLMResultLastHiddenLayer``."""

    _fields_ = [
        ("hidden_states", POINTER(c_float)),
        ("embd_size", c_int),
        ("num_tokens", c_int),
    ]


class RKLLMResultLogits(Structure):
    """``RKLLMResultLogits``."""

    _fields_ = [
        ("logits", POINTER(c_float)),
        ("vocab_size", c_int),
        ("num_tokens", c_int),
    ]


class RKLLMPerfStat(Structure):
    """``RKLLMPerfStat``: filled only in the FINISH callback."""

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int
    memory_usage_mb: float
    _fields_ = [
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    ]


class RKLLMResult(Structure):
    """``RKLLMResult``: valid only during the callback that receives it."""

    text: int | None  # read as a raw address (c_void_p) so NULL and bytes are copied safely
    token_id: int
    last_hidden_layer: RKLLMResultLastHiddenLayer
    logits: RKLLMResultLogits
    perf: RKLLMPerfStat
    _fields_ = [
        ("text", c_void_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# typedef int(*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
# The result pointer is declared as a plain address (same ABI as RKLLMResult*):
# the callback reads the few fields it needs at their offsets, which is much
# cheaper per token than materialising a POINTER(RKLLMResult) object.
LLMResultCallback = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_enum)

# sizeof() of the structs as Rockchip's headers declare them (runtime 1.2.3 and 1.3.0), by ABI and pointer width
# in bytes (8: 64-bit ARM, 4: 32-bit ARM). The ctypes mirrors (here, in abi12 and in abi13) must give the same
# sizes on the machine they run on: `rkllm doctor` checks them there, the tests against the full header facts.
HEADER_SIZES: dict[str, dict[int, dict[str, int]]] = {
    "1.2": {
        8: {"RKLLMParam": 208, "RKLLMInput": 64, "RKLLMInferParam": 32, "RKLLMResult": 72, "RKLLMExtendParam": 120},
        4: {"RKLLMParam": 188, "RKLLMInput": 36, "RKLLMInferParam": 16, "RKLLMResult": 52, "RKLLMExtendParam": 120},
    },
    "1.3": {
        8: {"RKLLMParam": 184, "RKLLMInput": 160, "RKLLMInferParam": 40, "RKLLMResult": 72, "RKLLMCallback": 48},
        4: {"RKLLMParam": 176, "RKLLMInput": 84, "RKLLMInferParam": 24, "RKLLMResult": 52, "RKLLMCallback": 24},
    },
}

__all__ = [
    "HEADER_SIZES",
    "LLMCallState",
    "LLMHandle",
    "LLMResultCallback",
    "RKLLMCrossAttnParam",
    "RKLLMEmbedInput",
    "RKLLMExtendParam",
    "RKLLMInferMode",
    "RKLLMInputType",
    "RKLLMLoraAdapter",
    "RKLLMLoraParam",
    "RKLLMPerfStat",
    "RKLLMPromptCacheParam",
    "RKLLMResult",
    "RKLLMResultLastHiddenLayer",
    "RKLLMResultLogits",
    "RKLLMTokenInput",
    "c_enum",
    "field_offset",
]
