"""The RKLLM 1.3 ABI (runtime 1.3.0).

Hard break from 1.2: ``rkllm_init`` takes a pointer to an ``RKLLMCallback``
struct, ``RKLLMParam`` gains ``ignore_eos_token`` and loses the image tags,
``RKLLMInferParam`` gains per-run ``sampling_params`` and ``max_new_tokens``,
and multimodal input is split into ``image`` and ``video`` parts.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_size_t,
    c_uint64,
    c_void_p,
)

from .structs import (
    LLMResultCallback,
    RKLLMEmbedInput,
    RKLLMExtendParam,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMTokenInput,
    c_enum,
)

ABI = "1.3"

# typedef int (*LLMGetEmbedCallback)(void* userdata, int32_t* tokens, uint64_t num_tokens,
#                                     void* embed, uint64_t len);
LLMGetEmbedCallback = ctypes.CFUNCTYPE(c_int, c_void_p, POINTER(c_int32), c_uint64, c_void_p, c_uint64)
# typedef int (*LLMTokenizerCallback)(void* userdata, const char* text, int32_t text_len,
#                                      int32_t* tokens, int32_t n_tokens_max);
LLMTokenizerCallback = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, POINTER(c_int32), c_int32)


class RKLLMParam(Structure):
    """``RKLLMParam`` (184 bytes on LP64)."""

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
    ignore_eos_token: bool
    is_async: bool
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
        ("ignore_eos_token", c_bool),
        ("is_async", c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class _RKLLMImageInput(Structure):
    _fields_ = [
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_start", c_char_p),
        ("image_end", c_char_p),
        ("image_content", c_char_p),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class _RKLLMVideoInput(Structure):
    _fields_ = [
        ("video_embed", POINTER(c_float)),
        ("n_frame_tokens", c_size_t),
        ("n_frame_per_video", c_size_t),
        ("n_video", c_size_t),
        ("video_start", c_char_p),
        ("video_end", c_char_p),
        ("video_content", c_char_p),
        ("frame_width", c_size_t),
        ("frame_height", c_size_t),
    ]


class RKLLMMultiModalInput(Structure):
    """``RKLLMMultiModalInput`` with its ``image`` and ``video`` parts."""

    _fields_ = [
        ("prompt", c_char_p),
        ("image", _RKLLMImageInput),
        ("video", _RKLLMVideoInput),
    ]


class _RKLLMInputUnion(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput),
    ]


class RKLLMInput(Structure):
    """``RKLLMInput`` with its anonymous union (160 bytes on LP64)."""

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


class RKLLMSamplingParam(Structure):
    """``RKLLMSamplingParam``: per-run sampling (1.3 only)."""

    top_k: int
    top_p: float
    temperature: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    _fields_ = [
        ("top_k", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
    ]


class RKLLMInferParam(Structure):
    """``RKLLMInferParam`` (40 bytes on LP64)."""

    mode: int
    keep_history: int
    max_new_tokens: int
    _fields_ = [
        ("mode", c_enum),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", POINTER(RKLLMSamplingParam)),
        ("keep_history", c_int),
        ("max_new_tokens", c_int32),
    ]


class RKLLMCallback(Structure):
    """``RKLLMCallback``: the callbacks and their userdata (48 bytes on LP64)."""

    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", c_void_p),
        ("tokenizer_callback", LLMTokenizerCallback),
        ("tokenizer_userdata", c_void_p),
        ("embed_callback", LLMGetEmbedCallback),
        ("embed_userdata", c_void_p),
    ]


# int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
INIT_CALLBACK_ARGTYPE = POINTER(RKLLMCallback)
