"""One backend object per ABI: it builds the structs the runtime takes, so ABI branches stop here.

Everything above the native layer speaks in plain Python values (:class:`RunRequest`,
:class:`~rkllm_core.params.InitParams`) and asks the backend what the runtime
can do (:attr:`Backend.per_run_sampling`) instead of comparing ABI strings.
The ctypes objects a call needs are returned together with everything that
must stay alive while the runtime may read them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import InvalidParameterError
from ..params import ImageTags, InitParams, SamplingParams, check_text
from . import abi12, abi13
from .callback import HIDDEN, LOGITS, RESULT_CALLBACK
from .functions import RuntimeFunctions
from .multimodal import ImageInput, MultimodalRequest, check_image_count, multimodal_request
from .structs import (
    LLMHandle,
    RKLLMInferMode,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
)

__all__ = ["Backend", "GenerationSettings", "InferMode", "RunRequest", "backend_for", "encode_path", "encode_text"]

_EXTEND_FIELDS = ("enabled_cpus_num", "enabled_cpus_mask", "n_batch", "embed_flash", "base_domain_id")


@dataclass(frozen=True, slots=True)
class RunRequest:
    """A validated run, in plain Python values (see :meth:`Backend.run_structs`)."""

    role: bytes
    prompt: bytes | None
    token_ids: tuple[int, ...] | None
    enable_thinking: bool
    keep_history: bool
    sampling: SamplingParams | None
    """Complete per-run sampling (every field set); 1.3 only."""
    max_new_tokens: int | None
    """Per-run limit the runtime enforces (1.3)."""
    lora: bytes | None
    save_prompt_cache: bytes | None
    mode: RKLLMInferMode = RKLLMInferMode.RKLLM_INFER_GENERATE
    stop_after: int = 0
    """Per-run limit the binding enforces (1.2, whose runtime fixes ``max_new_tokens`` at init):
    the callback counts tokens and the run is aborted after this many (0: none)."""
    multimodal: MultimodalRequest | None = None
    """The images of a multimodal run (``RKLLM_INPUT_MULTIMODAL``), or ``None``."""

    @property
    def tensor(self) -> int:
        """What the result callback copies for this run (see :func:`~rkllm_core.native.callback.open_channel`).

        :data:`~rkllm_core.native.callback.HIDDEN` or :data:`~rkllm_core.native.callback.LOGITS`
        for a hidden-state or logits run, 0 for text.
        """
        return _TENSOR_OF.get(self.mode, 0)


InferMode = Literal["generate", "hidden", "logits"]
"""What a run produces: text, the last hidden layer of every input token, or the last position's logits."""

_MODES: dict[str, RKLLMInferMode] = {
    "generate": RKLLMInferMode.RKLLM_INFER_GENERATE,
    "hidden": RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER,
    "logits": RKLLMInferMode.RKLLM_INFER_GET_LOGITS,
}
_TENSOR_OF: dict[RKLLMInferMode, int] = {
    RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER: HIDDEN,
    RKLLMInferMode.RKLLM_INFER_GET_LOGITS: LOGITS,
}


def encode_text(value: str, name: str) -> bytes:
    """Encode text for the runtime: a str, no NUL, valid UTF-8 (no lone surrogates).

    Raises:
        InvalidParameterError: ``value`` is not such a text (the message names ``name``).
    """
    return check_text(value, name).encode("utf-8")


def encode_path(value: str | os.PathLike[str], name: str) -> bytes:
    """Encode a path for the runtime (the file system's encoding; no NUL, which would cut it short).

    Raises:
        InvalidParameterError: the path contains a NUL (the message names ``name``).
    """
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise InvalidParameterError(f"{name} contains a NUL character: {os.fsdecode(raw)!r}")
    return raw


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """Where a request's sampling and ``max_new_tokens`` go (see :meth:`Backend.place_generation`).

    Attributes:
        instance: the init settings that select the instance (what a model manager keys
            instances by), or ``None`` for the model's defaults.
        run: the keyword arguments of the run (``sampling``, ``max_new_tokens``) that are set.
    """

    instance: InitParams | None
    run: dict[str, Any]


_PER_RUN_ONLY = (
    "per-run sampling needs the 1.3 runtime; on 1.2 it is fixed at init "
    "(pass it in InitParams, or let the model manager choose the instance)"
)


def _check_run_input(
    prompt: str | None, role: str, token_ids: Sequence[int] | None, mode: str, max_new_tokens: int | None
) -> None:
    """Refuse a run's malformed arguments (see :meth:`Backend.run_request`)."""
    if role not in ("user", "tool"):
        raise InvalidParameterError(f"role must be 'user' or 'tool', got {role!r}")
    if (prompt is None) == (token_ids is None):
        raise InvalidParameterError("pass exactly one of prompt or token_ids")
    if token_ids is not None and (
        not token_ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids)
    ):
        raise InvalidParameterError("token_ids must be a non-empty sequence of ints")
    if mode not in _MODES:
        raise InvalidParameterError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)):
        raise InvalidParameterError("max_new_tokens must be an int")


class Backend:
    """Builds the ABI's structs; subclasses exist per ABI.

    Attributes:
        abi: "1.2" or "1.3".
        per_run_sampling: the runtime takes sampling and ``max_new_tokens`` per run (1.3); on 1.2
            sampling is fixed at init and the binding enforces a run's ``max_new_tokens`` itself.
        functions: the bound native functions.
    """

    abi = ""
    per_run_sampling = False
    _module: Any = None

    def __init__(self, functions: RuntimeFunctions) -> None:
        self.functions = functions

    # -- sampling: per run or per instance --------------------------------------------------------------
    def place_generation(
        self,
        init: InitParams | None = None,
        sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
    ) -> GenerationSettings:
        """Decide where sampling and ``max_new_tokens`` go: the one place that rule lives.

        A request's ``max_new_tokens`` is always per run: the 1.3 runtime takes it with the
        run, and on 1.2 the binding ends the run at the limit itself, so it never selects an
        instance. Sampling is per run on 1.3, so one instance (with the model's defaults)
        serves every request; on 1.2 it is fixed at ``rkllm_init``, so it goes with the
        instance (what the model manager does with it is its sampling policy). An explicit
        ``init.max_new_tokens`` is the instance's own limit on 1.2 (the runtime stops there
        and reports its perf stats, as a benchmark wants), and the run's default on 1.3.
        ``sampling`` takes precedence over ``init``'s.

        Args:
            init: init settings asked for (may carry sampling and ``max_new_tokens``).
            sampling: a request's sampling.
            max_new_tokens: a request's generation limit.
        """
        base = init or InitParams()
        merged = base.sampling.merged(sampling)
        run: dict[str, Any] = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        if not self.per_run_sampling:
            instance = replace(base, sampling=merged)
            return GenerationSettings(None if instance == InitParams() else instance, run)
        if base.max_new_tokens is not None:
            run.setdefault("max_new_tokens", base.max_new_tokens)
        if not merged.is_empty():
            run["sampling"] = merged
        instance = replace(base, sampling=SamplingParams(), max_new_tokens=None)
        return GenerationSettings(None if instance == InitParams() else instance, run)

    def run_request(
        self,
        prompt: str | None,
        *,
        role: str = "user",
        enable_thinking: bool = False,
        keep_history: bool = False,
        sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
        lora: str | None = None,
        save_prompt_cache: str | os.PathLike[str] | None = None,
        token_ids: Sequence[int] | None = None,
        mode: InferMode = "generate",
        base_sampling: SamplingParams | None = None,
        multimodal: MultimodalRequest | None = None,
    ) -> RunRequest:
        """Validate a run's arguments and put them in a :class:`RunRequest`: the one place run input is checked.

        Args:
            prompt: the text, or ``None`` with ``token_ids``.
            role: "user", or "tool" for function results.
            enable_thinking: switch the template's thinking mode.
            keep_history: keep this turn in the KV cache.
            sampling: per-run sampling (1.3); the values it leaves unset come from ``base_sampling``.
            max_new_tokens: per-run limit (the runtime's on 1.3; the binding's own on 1.2, see
                :attr:`RunRequest.stop_after`).
            lora: the name of a loaded LoRA adapter.
            save_prompt_cache: write the run's prefill state to this file.
            token_ids: token input instead of a prompt.
            mode: what the run produces (see :data:`InferMode`).
            base_sampling: the instance's sampling with every value set (what a run uses when it sets none).
            multimodal: the run's images, from :meth:`image_request` (its prompt is ``prompt``).

        Raises:
            InvalidParameterError: anything wrong (nothing reaches the runtime).
        """
        _check_run_input(prompt, role, token_ids, mode, max_new_tokens)
        if sampling is not None and sampling.is_empty():
            sampling = None
        self.check_run_settings(sampling, max_new_tokens)
        by_binding = not self.per_run_sampling and max_new_tokens is not None and max_new_tokens > 0
        return RunRequest(
            role=role.encode(),
            prompt=encode_text(prompt, "prompt") if prompt is not None else None,
            token_ids=tuple(token_ids) if token_ids is not None else None,
            enable_thinking=bool(enable_thinking),
            keep_history=bool(keep_history),
            sampling=(base_sampling or SamplingParams()).merged(sampling) if sampling is not None else None,
            max_new_tokens=None if by_binding else max_new_tokens,
            lora=encode_text(lora, "lora") if lora else None,
            save_prompt_cache=encode_path(save_prompt_cache, "save_prompt_cache") if save_prompt_cache else None,
            mode=_MODES[mode],
            stop_after=max_new_tokens if by_binding and max_new_tokens is not None else 0,
            multimodal=multimodal,
        )

    def image_request(
        self,
        prompt: str | None,
        images: Sequence[ImageInput],
        *,
        image_size: tuple[int, int] | None = None,
        image_tags: ImageTags | None = None,
        image_digests: Sequence[str] | None = None,
        multi_image_abi12: bool = True,
        init_image_tags: ImageTags | None = None,
    ) -> MultimodalRequest:
        """Check a run's images and put them in a :class:`~.multimodal.MultimodalRequest` (for :meth:`run_request`).

        Args:
            prompt: the text, with one ``<image>`` per image.
            images: image embeddings, in prompt order (see :mod:`.multimodal`).
            image_size: the encoder's input (height, width).
            image_tags: the tags of this run (1.3; on 1.2 they are the instance's and must match).
            image_digests: one digest per image for the KV tag (default: SHA-256 of each embedding).
            multi_image_abi12: False for a family that takes one image per prompt on 1.2.
            init_image_tags: the instance's tags (:attr:`InitParams.image_tags`).

        Raises:
            ImageError: the images do not fit the prompt, the runtime or the family (nothing ran).
            InvalidParameterError: no prompt, missing or conflicting tags, a bad ``image_size``.
        """
        if prompt is None:
            raise InvalidParameterError("images need a prompt (with one <image> per image), not token_ids")
        check_image_count(self.abi, len(images), multi_image_abi12=multi_image_abi12)
        tags = self._run_image_tags(image_tags, init_image_tags)
        return multimodal_request(
            check_text(prompt, "prompt"), images, image_size=image_size, tags=tags, digests=image_digests
        )

    def _run_image_tags(self, run: ImageTags | None, init: ImageTags | None) -> ImageTags | None:  # pragma: no cover
        raise NotImplementedError

    def check_run_settings(self, sampling: SamplingParams | None, max_new_tokens: int | None) -> None:
        """Refuse per-run sampling where the runtime has none (1.2); ``max_new_tokens`` works on both.

        Raises:
            InvalidParameterError: sampling set for a run on a 1.2 runtime.
        """
        del max_new_tokens  # per run on 1.3; enforced by the binding on 1.2
        if not self.per_run_sampling and sampling is not None:
            raise InvalidParameterError(_PER_RUN_ONLY)

    # -- init ----------------------------------------------------------------------------------------
    def default_param(self) -> Any:
        """``rkllm_createDefaultParam()``: a fresh ``RKLLMParam`` of this ABI."""
        return self.functions.rkllm_createDefaultParam()

    def apply_init(self, param: Any, init: InitParams) -> None:
        """Write ``init`` (the values that are set) into ``param``.

        Raises:
            InvalidParameterError: a setting this ABI does not have.
        """
        for name in ("max_context_len", "max_new_tokens", "n_keep", "skip_special_token"):
            value = getattr(init, name)
            if value is not None:
                setattr(param, name, value)
        if init.ignore_eos_token is not None:
            self._set_ignore_eos(param, init.ignore_eos_token)
        for name, value in init.sampling.as_dict().items():
            if value is not None:
                setattr(param, name, value)
        ext = param.extend_param
        for name in _EXTEND_FIELDS:
            value = getattr(init, name)
            if value is not None:
                setattr(ext, name, int(value))
        if init.image_tags is not None:
            self._set_image_tags(param, init.image_tags)

    def _set_image_tags(self, param: Any, tags: ImageTags) -> None:
        """Write the image tags into ``RKLLMParam`` (1.2); on 1.3 they go with each run."""

    def _set_ignore_eos(self, param: Any, value: bool) -> None:
        raise InvalidParameterError(f"ignore_eos_token needs the 1.3 runtime (this one has ABI {self.abi})")

    def init(self, param: Any) -> tuple[int, int, tuple[Any, ...]]:
        """``rkllm_init`` with the process-wide result callback.

        Returns:
            (return code, handle or 0, objects to keep alive as long as the handle).
        """
        handle = LLMHandle()
        rc, keep = self._init(handle, param)
        return int(rc), int(handle.value or 0), keep

    def _init(self, handle: Any, param: Any) -> tuple[int, tuple[Any, ...]]:  # pragma: no cover - per ABI
        raise NotImplementedError

    @staticmethod
    def sampling_defaults(param: Any) -> dict[str, Any]:
        """The sampling values of an ``RKLLMParam`` (what a run uses when it sets none)."""
        return {name: getattr(param, name) for name in SamplingParams.__dataclass_fields__}

    # -- calls on a handle (plain values in, return codes out) --------------------------------------------
    def run(self, handle: int, inp: Any, infer: Any, userdata: int) -> int:
        """``rkllm_run`` (blocks until the run ends); ``inp`` is one ``RKLLMInput`` or an array of them (batched)."""
        ref = inp if isinstance(inp, ctypes.Array) else ctypes.byref(inp)
        return int(self.functions.rkllm_run(handle, ref, ctypes.byref(infer), userdata))

    def abort(self, handle: int) -> int:
        """``rkllm_abort``."""
        return int(self.functions.rkllm_abort(handle))

    def destroy(self, handle: int) -> int:
        """``rkllm_destroy``."""
        return int(self.functions.rkllm_destroy(handle))

    def clear_kv_cache(self, handle: int, keep_system_prompt: bool) -> int:
        """``rkllm_clear_kv_cache(handle, keep_system_prompt, NULL, NULL)``."""
        return int(self.functions.rkllm_clear_kv_cache(handle, 1 if keep_system_prompt else 0, None, None))

    def kv_cache_size(self, handle: int, n_batch: int) -> tuple[int, int]:
        """``rkllm_get_kv_cache_size``: (return code, positions of the first batch)."""
        sizes = (ctypes.c_int * max(1, n_batch))()
        rc = int(self.functions.rkllm_get_kv_cache_size(handle, sizes))
        return rc, int(sizes[0])

    def kv_cache_sizes(self, handle: int, n_batch: int) -> tuple[int, list[int]]:
        """``rkllm_get_kv_cache_size``: (return code, positions of every batch slot)."""
        sizes = (ctypes.c_int * max(1, n_batch))()
        rc = int(self.functions.rkllm_get_kv_cache_size(handle, sizes))
        return rc, [int(v) for v in sizes]

    def set_chat_template(self, handle: int, system: bytes, prefix: bytes, postfix: bytes) -> int:
        """``rkllm_set_chat_template``."""
        return int(self.functions.rkllm_set_chat_template(handle, system, prefix, postfix))

    def set_function_tools(self, handle: int, system: bytes, tools: bytes, response_tag: bytes) -> int:
        """``rkllm_set_function_tools``."""
        return int(self.functions.rkllm_set_function_tools(handle, system, tools, response_tag))

    def load_prompt_cache(self, handle: int, path: bytes) -> int:
        """``rkllm_load_prompt_cache``."""
        return int(self.functions.rkllm_load_prompt_cache(handle, path))

    def release_prompt_cache(self, handle: int) -> int:
        """``rkllm_release_prompt_cache``."""
        return int(self.functions.rkllm_release_prompt_cache(handle))

    def load_lora(self, handle: int, path: bytes, name: bytes, scale: float) -> int:
        """``rkllm_load_lora``."""
        adapter = RKLLMLoraAdapter(path, name, float(scale))
        return int(self.functions.rkllm_load_lora(handle, ctypes.byref(adapter)))

    # -- runs -----------------------------------------------------------------------------------------
    def run_structs(self, req: RunRequest) -> tuple[Any, Any, tuple[Any, ...]]:
        """``RKLLMInput`` and ``RKLLMInferParam`` for a run, and what must outlive it."""
        inp = self._module.RKLLMInput()
        keep: list[Any] = [inp]
        self._fill_input(inp, req, keep)
        infer = self._infer_param(req, keep)
        return inp, infer, tuple(keep)

    def batch_structs(self, reqs: Sequence[RunRequest]) -> tuple[Any, Any, tuple[Any, ...]]:
        """An array of ``RKLLMInput`` (one per slot) and the one ``RKLLMInferParam`` they share, for a batched run.

        The infer param is built from the first request: the slots of a batched run share
        mode, sampling, ``max_new_tokens`` and LoRA by the runtime's contract, and
        ``keep_history`` is always 0 (per-slot history is not documented).

        Raises:
            InvalidParameterError: no request, or one that keeps history or does not generate text.
        """
        if not reqs:
            raise InvalidParameterError("a batched run needs at least one input")
        if any(r.keep_history or r.mode != RKLLMInferMode.RKLLM_INFER_GENERATE or r.save_prompt_cache for r in reqs):
            raise InvalidParameterError("batched runs generate text without keep_history or save_prompt_cache")
        inputs = (self._module.RKLLMInput * len(reqs))()
        keep: list[Any] = [inputs]
        for slot, req in zip(inputs, reqs, strict=True):
            self._fill_input(slot, req, keep)
        infer = self._infer_param(reqs[0], keep)
        return inputs, infer, tuple(keep)

    def _fill_input(self, inp: Any, req: RunRequest, keep: list[Any]) -> None:
        """Write ``req``'s role, thinking switch and prompt (or token ids) into ``inp``; keep what it points to."""
        inp.role = req.role
        inp.enable_thinking = req.enable_thinking
        if req.multimodal is not None:
            assert req.prompt is not None
            self._fill_multimodal(inp, req.prompt, req.multimodal, keep)
        elif req.prompt is not None:
            inp.input_type = RKLLMInputType.RKLLM_INPUT_PROMPT
            inp.prompt_input = req.prompt
            keep.append(req.prompt)
        else:
            assert req.token_ids is not None
            ids = (ctypes.c_int32 * len(req.token_ids))(*req.token_ids)
            inp.input_type = RKLLMInputType.RKLLM_INPUT_TOKEN
            inp.token_input.input_ids = ids
            inp.token_input.n_tokens = len(req.token_ids)
            keep.append(ids)

    def _fill_multimodal(self, inp: Any, prompt: bytes, m: MultimodalRequest, keep: list[Any]) -> None:
        """Write a multimodal input; the embedding is copied into a buffer that ``keep`` holds for the run."""
        buf = (ctypes.c_float * (len(m.embed) // 4)).from_buffer_copy(m.embed)
        keep.extend((prompt, buf))
        inp.input_type = RKLLMInputType.RKLLM_INPUT_MULTIMODAL
        mm = inp.multimodal_input
        mm.prompt = prompt
        part = self._image_part(mm, m, keep)
        part.image_embed = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
        part.n_image_tokens = m.n_image_tokens
        part.n_image = m.n_image
        part.image_width = m.image_width
        part.image_height = m.image_height

    def _image_part(self, mm: Any, m: MultimodalRequest, keep: list[Any]) -> Any:  # pragma: no cover - per ABI
        raise NotImplementedError

    def _infer_param(self, req: RunRequest, keep: list[Any]) -> Any:
        """The ``RKLLMInferParam`` of ``req`` (kept alive through ``keep``, with what it points to)."""
        infer = self._module.RKLLMInferParam()
        infer.mode = req.mode
        infer.keep_history = 1 if req.keep_history else 0
        keep.append(infer)
        if req.lora:
            lp = RKLLMLoraParam(req.lora)
            infer.lora_params = ctypes.pointer(lp)
            keep.append(lp)
        if req.save_prompt_cache:
            pc = RKLLMPromptCacheParam(1, req.save_prompt_cache)
            infer.prompt_cache_params = ctypes.pointer(pc)
            keep.append(pc)
        self._per_run(infer, req, keep)
        return infer

    def _per_run(self, infer: Any, req: RunRequest, keep: list[Any]) -> None:
        self.check_run_settings(req.sampling, req.max_new_tokens)


class _Backend12(Backend):
    abi = "1.2"
    per_run_sampling = False
    _module = abi12

    def _init(self, handle: Any, param: Any) -> tuple[int, tuple[Any, ...]]:
        rc = self.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), RESULT_CALLBACK)
        return rc, (param,)

    def _set_image_tags(self, param: Any, tags: ImageTags) -> None:
        param.img_start = tags.start.encode()
        param.img_end = tags.end.encode()
        param.img_content = tags.content.encode()

    def _run_image_tags(self, run: ImageTags | None, init: ImageTags | None) -> ImageTags | None:
        if init is None:
            raise InvalidParameterError(
                "the RKLLM 1.2 runtime takes the image tags at init: load the model with InitParams(image_tags=...)"
            )
        if run is not None and run != init:
            raise InvalidParameterError(
                f"the RKLLM 1.2 runtime fixed the image tags at init ({init}); this run asks for {run}"
            )
        return None

    def _image_part(self, mm: Any, m: MultimodalRequest, keep: list[Any]) -> Any:
        return mm


class _Backend13(Backend):
    abi = "1.3"
    per_run_sampling = True
    _module = abi13

    def _set_ignore_eos(self, param: Any, value: bool) -> None:
        param.ignore_eos_token = value

    def _init(self, handle: Any, param: Any) -> tuple[int, tuple[Any, ...]]:
        cb = abi13.RKLLMCallback()
        cb.result_callback = RESULT_CALLBACK
        rc = self.functions.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(cb))
        return rc, (param, cb)

    def _run_image_tags(self, run: ImageTags | None, init: ImageTags | None) -> ImageTags | None:
        tags = run if run is not None else init
        if tags is None:
            raise InvalidParameterError("a run with images needs image_tags (or InitParams.image_tags)")
        return tags

    def _image_part(self, mm: Any, m: MultimodalRequest, keep: list[Any]) -> Any:
        part = mm.image
        assert m.tags is not None
        keep.append(m.tags)
        part.image_start, part.image_end, part.image_content = m.tags
        return part

    def _per_run(self, infer: Any, req: RunRequest, keep: list[Any]) -> None:
        if req.sampling is not None:
            sp = abi13.RKLLMSamplingParam()
            for name, value in req.sampling.as_dict().items():
                setattr(sp, name, value)
            infer.sampling_params = ctypes.pointer(sp)
            keep.append(sp)
        if req.max_new_tokens is not None:
            infer.max_new_tokens = req.max_new_tokens


_BACKENDS: dict[str, type[Backend]] = {"1.2": _Backend12, "1.3": _Backend13}


def backend_for(functions: RuntimeFunctions) -> Backend:
    """The backend of the ABI ``functions`` were bound for."""
    return _BACKENDS[functions.abi](functions)
