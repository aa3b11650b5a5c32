"""The RKLLM 1.2 ABI (runtime 1.2.1, 1.2.2 and 1.2.3; identical layouts).

1.2.3 renamed ``RKLLMMultiModelInput`` to ``RKLLMMultiModalInput``; both
names are provided.
"""

from __future__ import annotations

from ctypes import POINTER, Structure, Union, c_bool, c_char_p, c_float, c_int, c_int32, c_size_t

from .structs import (
    LLMResultCallback,
    RKLLMEmbedInput,
    RKLLMExtendParam,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMTokenInput,
    c_enum,
)

ABI = "1.2"


class RKLLMParam(Structure):
    """``RKLLMParam`` (208 bytes on LP64)."""

    model_path: bytes | None
    max_context_len: int
    max_new_tokens: int
    top_k: int
    n_keep: int
    top_p: float
    temperature: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    skip_special_token: bool
    is_async: bool
    img_start: bytes | None
    img_end: bytes | None
    img_content: bytes | None
    extend_param: RKLLMExtendParam
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMMultiModalInput(Structure):
    """``RKLLMMultiModalInput`` (``RKLLMMultiModelInput`` before 1.2.3)."""

    _fields_ = [
        ("prompt", c_char_p),
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


RKLLMMultiModelInput = RKLLMMultiModalInput


class _RKLLMInputUnion(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput),
    ]


class RKLLMInput(Structure):
    """``RKLLMInput`` with its anonymous union (64 bytes on LP64)."""

    role: bytes | None
    enable_thinking: bool
    input_type: int
    prompt_input: bytes | None
    _anonymous_ = ("_u",)
    _fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", c_enum),
        ("_u", _RKLLMInputUnion),
    ]


class RKLLMInferParam(Structure):
    """``RKLLMInferParam`` (32 bytes on LP64)."""

    mode: int
    keep_history: int
    _fields_ = [
        ("mode", c_enum),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("keep_history", c_int),
    ]


# int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
INIT_CALLBACK_ARGTYPE = LLMResultCallback
