"""A safe handle on one loaded model: init, streaming runs, abort, caches, close.

Thread model:

* One generation per handle at a time. Callers queue on a FIFO lock
  (optionally with a timeout that raises :class:`~rkllm_core.errors.BusyError`).
* Each run has a worker thread that calls the blocking ``rkllm_run``; the
  runtime's callback only copies bytes into the run's queue. The worker always
  posts an end marker and releases the handle lock once ``rkllm_run`` has
  returned, so a consumer can never hang and a queued caller starts as soon as
  the NPU is free. The end of a run is ``rkllm_run`` returning; a FINISH
  callback is not required (none may come after an abort).
* The consumer (an iterator or an async iterator) decodes UTF-8 incrementally
  and, if it stops early or its task is cancelled, calls ``rkllm_abort``.
* ``close()`` is idempotent: it refuses new runs, aborts the current one,
  waits for it to end and only then calls ``rkllm_destroy``. A
  ``weakref.finalize`` does the same if the handle is dropped unclosed.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from .._sync import FifoLock
from ..errors import (
    BusyError,
    HandleClosedError,
    InitError,
    InvalidParameterError,
    ModelFileError,
    NativeError,
    RKLLMError,
    RunError,
)
from ..native import callback
from ..native.callback import END, ERROR, FINISH, NORMAL, WAITING
from ..native.functions import RuntimeFunctions, abi_module
from ..native.library import RuntimeLibrary, load_library
from ..native.structs import (
    LLMHandle,
    RKLLMInferMode,
    RKLLMInputType,
    RKLLMLoraAdapter,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
)
from ..params import FinishReason, InitParams, PerfStats, SamplingParams, StreamChunk

logger = logging.getLogger(__name__)

Role = Literal["user", "tool"]

__all__ = ["Completion", "RKLLMRuntime", "Role", "RunOptions", "RunStream"]

# How long close()/a finalizer waits for an aborted run to return before giving up on destroy.
_ABORT_WAIT_S = 60.0


class RunOptions(TypedDict, total=False):
    """Per-run options of :meth:`RKLLMRuntime.stream` / :meth:`RKLLMRuntime.astream`."""

    role: Role
    """"user", or "tool" for function results (a JSON array)."""
    enable_thinking: bool
    """Switch the template's thinking mode (Qwen3)."""
    keep_history: bool
    """Keep this turn in the KV cache for the next run."""
    sampling: SamplingParams | None
    """Per-run sampling (1.3 only)."""
    max_new_tokens: int | None
    """Per-run limit (1.3 only; <= 0 means the init value)."""
    lora: str | None
    """The name of a loaded LoRA adapter to apply."""
    save_prompt_cache: str | os.PathLike[str] | None
    """Write this run's prefill state to this file."""
    token_ids: Sequence[int] | None
    """Token input instead of a prompt."""


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of a whole (non-streamed) run."""

    text: str
    finish_reason: FinishReason
    stats: PerfStats | None
    tokens: int


class _HandleState:
    """What a handle's finalizer needs. It never references the RKLLMRuntime."""

    def __init__(self, fns: RuntimeFunctions, handle: int, keepalive: tuple[Any, ...]) -> None:
        self.fns = fns
        self.handle = handle
        self.keepalive = keepalive  # param struct, model path, 1.3 callback struct
        self.lock = FifoLock()
        self.closed = False
        self.destroyed = False
        self.running = False
        self.current: _Run | None = None
        self.mutex = threading.Lock()

    def abort_current(self) -> bool:
        with self.mutex:
            run = self.current
            if run is None:
                return False
            run.aborted = True
        rc = self.fns.rkllm_abort(self.handle)
        if rc != 0:
            logger.warning("rkllm_abort returned %d", rc)
        return True


def _destroy(state: _HandleState) -> None:
    """Close a handle: refuse new work, abort, wait for the run to end, destroy."""
    if state.destroyed:
        return
    state.closed = True
    state.abort_current()
    if not state.lock.acquire(timeout=_ABORT_WAIT_S):
        logger.error("a run did not end %.0f s after rkllm_abort; not destroying the handle", _ABORT_WAIT_S)
        return
    try:
        if not state.destroyed:
            state.destroyed = True
            rc = state.fns.rkllm_destroy(state.handle)
            if rc != 0:
                logger.warning("rkllm_destroy returned %d", rc)
    finally:
        state.lock.release()


class _Run:
    """One prepared run: the ctypes inputs (kept alive until it ends) and its decoding state."""

    def __init__(self, max_new_tokens: int, keepalive: tuple[Any, ...]) -> None:
        self.max_new_tokens = max_new_tokens
        self.keepalive = keepalive
        self.aborted = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stats: PerfStats | None = None
        self.error = False
        self.tokens = 0
        self.ended = False  # the worker's end marker was consumed: rkllm_run has returned
        self.deferred: RKLLMError | None = None  # a failure to raise once the chunks before it are out
        self.finish_reason: FinishReason | None = None

    def feed_many(self, items: list[tuple[Any, ...]]) -> list[StreamChunk]:
        """Turn a batch of channel items into chunks, the final one last if the run ended.

        Consecutive tokens that arrived while the consumer was busy become one
        chunk (``n_tokens`` says how many): the consumer never falls behind the
        runtime by doing per-token work for tokens it has already missed. At
        board speeds the consumer is always waiting, so chunks are single tokens.
        """
        out: list[StreamChunk] = []
        pending: list[bytes] = []
        n = 0
        last_token: int | None = None
        for item in items:
            kind = item[0]
            if kind == NORMAL:
                pending.append(item[1])
                last_token = item[2]
                n += 1
                continue
            if kind == WAITING:
                n += 1
                continue
            if pending or n:
                self._emit(out, pending, n, last_token)
                pending, n = [], 0
            if kind == FINISH:
                p = item[1]
                self.stats = PerfStats(
                    float(p.prefill_time_ms),
                    int(p.prefill_tokens),
                    float(p.generate_time_ms),
                    int(p.generate_tokens),
                    float(p.memory_usage_mb),
                )
            elif kind == ERROR:
                self.error = True
            elif kind == END:
                try:
                    out.append(self.end(item[1], item[2]))
                except RKLLMError as exc:
                    if not out:
                        raise
                    self.deferred = exc  # deliver the text that came before the failure first
                return out
        if pending or n:
            self._emit(out, pending, n, last_token)
        return out

    def _emit(self, out: list[StreamChunk], pending: list[bytes], n: int, token: int | None) -> None:
        self.tokens += n
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        text = self.decoder.decode(data) if data else ""
        if text:
            out.append(StreamChunk(text, token, None, None, n))
        elif out and out[-1].finish_reason is None:  # count held-back tokens on the previous chunk
            out[-1] = out[-1]._replace(n_tokens=out[-1].n_tokens + n)

    def end(self, rc: int, exc: BaseException | None) -> StreamChunk:
        """Build the final chunk, or raise if the run failed."""
        self.ended = True
        tail = self.decoder.decode(b"", final=True)
        if exc is not None:
            raise RunError(f"rkllm_run raised {exc!r}", function="rkllm_run") from exc
        if self.aborted:
            reason: FinishReason = "abort"
        elif self.error or rc != 0:
            raise RunError(
                f"generation failed: the runtime reported an error (rkllm_run returned {rc})",
                code=rc,
                function="rkllm_run",
            )
        else:
            generated = self.stats.generate_tokens if self.stats is not None else self.tokens
            reason = "length" if 0 < self.max_new_tokens <= max(generated, self.tokens) else "stop"
        self.finish_reason = reason
        return StreamChunk(tail, None, reason, self.stats, 0)


class RunStream(Iterator[StreamChunk]):
    """A synchronous stream of :class:`StreamChunk` for one run.

    The run starts (waiting its turn on the handle) at the first ``next()``.
    Stopping early — ``break``, ``close()``, garbage collection or leaving a
    ``with`` block — aborts the run and waits until the runtime has returned.
    The final chunk has ``finish_reason`` set and, when the runtime reported
    them, ``stats``.
    """

    def __init__(self, owner: RKLLMRuntime, prepared: _Prepared, timeout: float | None) -> None:
        self._owner = owner
        self._prepared = prepared
        self._timeout = timeout
        self._run: _Run | None = None
        self._channel: callback.RunChannel | None = None
        self._done = False
        self._pieces: list[str] = []
        self._ready: deque[StreamChunk] = deque()

    @property
    def text(self) -> str:
        """All text yielded so far."""
        return "".join(self._pieces)

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the run ended, once it has."""
        return self._run.finish_reason if self._run else None

    @property
    def stats(self) -> PerfStats | None:
        """The runtime's perf stats, once reported."""
        return self._run.stats if self._run else None

    def __iter__(self) -> RunStream:
        return self

    def __enter__(self) -> RunStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> StreamChunk:
        if self._ready:
            return self._ready.popleft()
        if self._run is not None and self._run.deferred is not None and not self._done:
            self._done = True
            raise self._run.deferred
        if self._done:
            raise StopIteration
        if self._run is None:
            if not self._owner._state.lock.acquire(self._timeout):
                self._done = True
                raise BusyError(f"the model stayed busy for {self._timeout} s; try again later")
            self._run, self._channel = self._owner._start_locked(self._prepared)
        run, channel = self._run, self._channel
        assert channel is not None
        try:
            while True:
                chunks = run.feed_many(channel.get_many())
                if chunks:
                    self._pieces.extend(c.text for c in chunks)
                    if chunks[-1].finish_reason is not None:
                        self._done = True
                    self._ready.extend(chunks[1:])
                    return chunks[0]
        except BaseException:
            if run.ended:  # the run failed and is over: nothing to stop or wait for
                self._done = True
            elif not self._done:  # KeyboardInterrupt and the like: stop the NPU too
                self.close()
            raise

    def abort(self) -> None:
        """Ask the runtime to stop; the stream then ends with ``finish_reason='abort'``."""
        if self._run is not None and not self._done:
            self._owner._state.abort_current()

    def close(self) -> None:
        """Abort if still running and wait until the runtime has returned."""
        if self._done:
            return
        self._done = True
        if self._run is None or self._channel is None:
            return
        self._owner._state.abort_current()
        with contextlib.suppress(Exception):
            while self._channel.queue.get(timeout=_ABORT_WAIT_S)[0] != END:
                pass
        self._run.finish_reason = self._run.finish_reason or "abort"

    def __del__(self) -> None:
        # A stream dropped mid-run must not leave the NPU generating for nobody.
        if not self._done and self._run is not None:
            with contextlib.suppress(Exception):
                self._owner._state.abort_current()


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Validated run arguments, converted at run start into ctypes structs."""

    role: bytes
    prompt: bytes | None
    token_ids: tuple[int, ...] | None
    enable_thinking: bool
    keep_history: bool
    sampling: SamplingParams | None
    max_new_tokens: int | None
    lora: bytes | None
    save_prompt_cache: bytes | None


class RKLLMRuntime:
    """One model loaded into the runtime.

    Args:
        model_path: the ``.rkllm`` file.
        params: init settings on top of ``rkllm_createDefaultParam()``.
        library: a :class:`~rkllm_core.native.library.RuntimeLibrary`, or a path to
            the runtime (default: ``RKLLM_LIB_PATH``, then the usual places).
        abi: force the ABI ("1.2" or "1.3"); default ``RKLLM_ABI`` or detection.

    Raises:
        ModelFileError: the model file does not exist.
        InitError: ``rkllm_init`` failed.
        LibraryNotFoundError, ABIError: see :func:`~rkllm_core.native.library.load_library`.

    Example:
        >>> with RKLLMRuntime("qwen3.rkllm") as rt:  # doctest: +SKIP
        ...     for chunk in rt.stream("Hello"):
        ...         print(chunk.text, end="")
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        params: InitParams | None = None,
        library: RuntimeLibrary | str | os.PathLike[str] | None = None,
        abi: str | None = None,
    ) -> None:
        self.library = library if isinstance(library, RuntimeLibrary) else load_library(library, abi)
        self.model_path = Path(model_path)
        self.params = params or InitParams()
        if not self.model_path.is_file():
            raise ModelFileError(f"model file not found: {self.model_path}")
        fns = self.library.functions
        param = fns.rkllm_createDefaultParam()
        path_bytes = os.fsencode(self.model_path)
        param.model_path = path_bytes
        self._apply_init_params(param)
        self.max_new_tokens = int(param.max_new_tokens)
        self.max_context_len = int(param.max_context_len)
        handle = LLMHandle()
        if self.library.abi == "1.3":
            cb = abi_module(self.library.abi).RKLLMCallback()
            cb.result_callback = callback.RESULT_CALLBACK
            rc = fns.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(cb))
            keepalive: tuple[Any, ...] = (param, path_bytes, cb)
        else:
            rc = fns.rkllm_init(ctypes.byref(handle), ctypes.byref(param), callback.RESULT_CALLBACK)
            keepalive = (param, path_bytes)
        if rc != 0 or not handle.value:
            raise InitError(
                f"rkllm_init failed for {self.model_path} (code {rc}); check the model file, that "
                f"max_context_len={self.max_context_len} is within the model's limit, the NPU driver "
                "version and /dev permissions (the runtime's own log above has details)",
                code=rc,
                function="rkllm_init",
            )
        self._state = _HandleState(fns, handle.value, keepalive)
        self._finalizer = weakref.finalize(self, _destroy, self._state)
        logger.info("loaded %s (ABI %s)", self.model_path.name, self.library.abi)

    # -- init helpers -------------------------------------------------------------------------
    def _apply_init_params(self, param: Any) -> None:
        p = self.params
        for name in ("max_context_len", "max_new_tokens", "n_keep", "skip_special_token"):
            value = getattr(p, name)
            if value is not None:
                setattr(param, name, value)
        if p.ignore_eos_token is not None:
            if self.library.abi != "1.3":
                raise InvalidParameterError("ignore_eos_token needs the 1.3 runtime")
            param.ignore_eos_token = p.ignore_eos_token
        for name, value in p.sampling.as_dict().items():
            if value is not None:
                setattr(param, name, value)
        ext = param.extend_param
        for name in ("enabled_cpus_num", "enabled_cpus_mask", "n_batch", "embed_flash", "base_domain_id"):
            value = getattr(p, name)
            if value is not None:
                setattr(ext, name, int(value))

    # -- state ------------------------------------------------------------------------------------
    @property
    def abi(self) -> str:
        """The runtime ABI in use ("1.2" or "1.3")."""
        return self.library.abi

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._state.closed

    @property
    def is_running(self) -> bool:
        """True while a run is generating on this handle."""
        return self._state.running

    def _check_open(self) -> None:
        if self._state.closed:
            raise HandleClosedError(f"the runtime handle for {self.model_path.name} is closed")

    def close(self) -> None:
        """Abort any run, wait for it to end, then destroy the handle. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> RKLLMRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def abort(self) -> bool:
        """Abort the current run, if any. Returns True if a run was aborted. Does not wait."""
        return self._state.abort_current()

    @contextlib.contextmanager
    def _exclusive(self, timeout: float | None) -> Iterator[None]:
        self._check_open()
        if not self._state.lock.acquire(timeout):
            raise BusyError(f"the model stayed busy for {timeout} s")
        try:
            self._check_open()
            yield
        finally:
            self._state.lock.release()

    def _call(self, name: str, *args: Any, timeout: float | None = None) -> int:
        with self._exclusive(timeout):
            rc = int(getattr(self._state.fns, name)(self._state.handle, *args))
        if rc != 0:
            raise NativeError(f"{name} failed (code {rc})", code=rc, function=name)
        return rc

    # -- runs --------------------------------------------------------------------------------------
    def _prepare(
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
    ) -> _Prepared:
        self._check_open()
        if role not in ("user", "tool"):
            raise InvalidParameterError(f"role must be 'user' or 'tool', got {role!r}")
        if (prompt is None) == (token_ids is None):
            raise InvalidParameterError("pass exactly one of prompt or token_ids")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidParameterError(f"prompt must be a str, got {type(prompt).__name__}")
            if "\0" in prompt:
                raise InvalidParameterError("prompt contains a NUL character")
        if token_ids is not None and (not token_ids or not all(isinstance(t, int) for t in token_ids)):
            raise InvalidParameterError("token_ids must be a non-empty sequence of ints")
        if sampling is not None and sampling.is_empty():
            sampling = None
        if self.abi == "1.2" and (sampling is not None or max_new_tokens is not None):
            raise InvalidParameterError(
                "per-run sampling and max_new_tokens need the 1.3 runtime; on 1.2 they are fixed at init "
                "(pass them in InitParams, or let the model manager re-initialise)"
            )
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)):
            raise InvalidParameterError("max_new_tokens must be an int")
        return _Prepared(
            role=role.encode(),
            prompt=prompt.encode("utf-8", "surrogatepass") if prompt is not None else None,
            token_ids=tuple(token_ids) if token_ids is not None else None,
            enable_thinking=bool(enable_thinking),
            keep_history=bool(keep_history),
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            lora=lora.encode() if lora else None,
            save_prompt_cache=os.fsencode(save_prompt_cache) if save_prompt_cache else None,
        )

    def _start_locked(self, prep: _Prepared) -> tuple[_Run, callback.RunChannel]:
        """Start a run; the caller holds the handle lock, which the worker releases."""
        state = self._state
        try:
            if state.closed:
                raise HandleClosedError(f"the runtime handle for {self.model_path.name} is closed")
            m = abi_module(self.library.abi)
            inp = m.RKLLMInput()
            inp.role = prep.role
            inp.enable_thinking = prep.enable_thinking
            keep: list[Any] = [inp]
            if prep.prompt is not None:
                inp.input_type = RKLLMInputType.RKLLM_INPUT_PROMPT
                inp.prompt_input = prep.prompt
                keep.append(prep.prompt)
            else:
                assert prep.token_ids is not None
                ids = (ctypes.c_int32 * len(prep.token_ids))(*prep.token_ids)
                inp.input_type = RKLLMInputType.RKLLM_INPUT_TOKEN
                inp.token_input.input_ids = ids
                inp.token_input.n_tokens = len(prep.token_ids)
                keep.append(ids)
            infer = m.RKLLMInferParam()
            infer.mode = RKLLMInferMode.RKLLM_INFER_GENERATE
            infer.keep_history = 1 if prep.keep_history else 0
            keep.append(infer)
            if prep.lora:
                lp = RKLLMLoraParam(prep.lora)
                infer.lora_params = ctypes.pointer(lp)
                keep.append(lp)
            if prep.save_prompt_cache:
                pc = RKLLMPromptCacheParam(1, prep.save_prompt_cache)
                infer.prompt_cache_params = ctypes.pointer(pc)
                keep.append(pc)
            max_new = self.max_new_tokens
            if self.abi == "1.3":
                if prep.sampling is not None:
                    sp = m.RKLLMSamplingParam()
                    base = self.params.sampling.merged(prep.sampling)
                    defaults = self._default_sampling()
                    for name, value in base.as_dict().items():
                        setattr(sp, name, value if value is not None else defaults[name])
                    infer.sampling_params = ctypes.pointer(sp)
                    keep.append(sp)
                if prep.max_new_tokens is not None:
                    infer.max_new_tokens = prep.max_new_tokens
                    if prep.max_new_tokens > 0:
                        max_new = prep.max_new_tokens
            run = _Run(max_new, tuple(keep))
            run_id, channel = callback.open_channel()
            with state.mutex:
                state.current = run
                state.running = True
            worker = threading.Thread(
                target=_run_worker,
                args=(state, run_id, channel, inp, infer),
                name=f"rkllm-run-{run_id}",
                daemon=True,
            )
            worker.start()
            return run, channel
        except BaseException:
            state.running = False
            state.current = None
            state.lock.release()
            raise

    def _default_sampling(self) -> dict[str, Any]:
        param = self._state.keepalive[0]
        return {name: getattr(param, name) for name in SamplingParams.__dataclass_fields__}

    def stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RunOptions],
    ) -> RunStream:
        """Start a generation and return its chunk stream.

        Args:
            prompt: the text (the runtime applies the model's chat template).
            timeout: seconds to wait for the handle before raising ``BusyError``.
            **options: see :class:`RunOptions` (``role``, ``enable_thinking``,
                ``keep_history``, ``sampling``, ``max_new_tokens``, ``lora``,
                ``save_prompt_cache``, ``token_ids``).

        Raises:
            InvalidParameterError: bad arguments (nothing reaches the runtime).
            HandleClosedError: the handle was closed.
        """
        prep = self._prepare(prompt, **options)
        return RunStream(self, prep, timeout)

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[RunOptions]
    ) -> Completion:
        """Run to the end and return the whole text (same arguments as :meth:`stream`)."""
        with self.stream(prompt, timeout=timeout, **options) as s:
            final = None
            for chunk in s:
                final = chunk
            assert final is not None and final.finish_reason is not None
            return Completion(s.text, final.finish_reason, final.stats, s._run.tokens if s._run else 0)

    async def astream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncIterator[StreamChunk]:
        """Async version of :meth:`stream`; never blocks the event loop.

        Cancelling the consuming task, or closing the generator early
        (use ``contextlib.aclosing``), aborts the run on the NPU.
        """
        prep = self._prepare(prompt, **options)
        if not await self._state.lock.acquire_async(timeout):
            raise BusyError(f"the model stayed busy for {timeout} s; try again later")
        run, channel = self._start_locked(prep)
        finished = False
        try:
            while True:
                for chunk in run.feed_many(await channel.get_many_async()):
                    if chunk.finish_reason is not None:
                        finished = True
                    yield chunk
                if run.deferred is not None:
                    finished = True
                    raise run.deferred
                if finished:
                    return
        finally:
            if not finished:
                # Do not wait here: the worker releases the handle when rkllm_run returns.
                self._state.abort_current()

    # -- other native calls --------------------------------------------------------------------
    def clear_kv_cache(self, keep_system_prompt: bool = False, *, timeout: float | None = None) -> None:
        """Empty the KV cache (optionally keeping the system prompt)."""
        self._call("rkllm_clear_kv_cache", 1 if keep_system_prompt else 0, None, None, timeout=timeout)

    def kv_cache_size(self, *, timeout: float | None = None) -> int:
        """Return the number of positions in the KV cache (of the first batch)."""
        n = max(1, self.params.n_batch or 1)
        sizes = (ctypes.c_int * n)()
        self._call("rkllm_get_kv_cache_size", sizes, timeout=timeout)
        return int(sizes[0])

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """Replace the model's chat template with literal strings (you supply special tokens)."""
        args = [
            _c_text(v, name)
            for v, name in (
                (system_prompt, "system_prompt"),
                (prompt_prefix, "prompt_prefix"),
                (prompt_postfix, "prompt_postfix"),
            )
        ]
        self._call("rkllm_set_chat_template", *args)

    def set_function_tools(
        self, system_prompt: str, tools: str | Sequence[dict[str, Any]], tool_response_str: str = "tool_response"
    ) -> None:
        """Install a system prompt and OpenAI-style tool definitions (a JSON array)."""
        if not isinstance(tools, str):
            try:
                tools = json.dumps(list(tools), ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise InvalidParameterError(f"tools are not JSON-serialisable: {exc}") from exc
        else:
            try:
                if not isinstance(json.loads(tools), list):
                    raise InvalidParameterError("tools must be a JSON array")
            except json.JSONDecodeError as exc:
                raise InvalidParameterError(f"tools is not valid JSON: {exc}") from exc
        self._call(
            "rkllm_set_function_tools",
            _c_text(system_prompt, "system_prompt"),
            _c_text(tools, "tools"),
            _c_text(tool_response_str, "tool_response_str"),
        )

    def load_prompt_cache(self, path: str | os.PathLike[str]) -> None:
        """Load a prompt cache file saved by an earlier run (``save_prompt_cache=``)."""
        if not Path(path).is_file():
            raise InvalidParameterError(f"prompt cache file not found: {path}")
        self._call("rkllm_load_prompt_cache", os.fsencode(path))

    def release_prompt_cache(self) -> None:
        """Unload the loaded prompt cache."""
        self._call("rkllm_release_prompt_cache")

    def load_lora(self, path: str | os.PathLike[str], name: str, scale: float = 1.0) -> None:
        """Load a LoRA adapter; apply it to a run with ``lora=name``."""
        if not Path(path).is_file():
            raise InvalidParameterError(f"LoRA adapter file not found: {path}")
        adapter = RKLLMLoraAdapter(os.fsencode(path), _c_text(name, "name"), float(scale))
        self._call("rkllm_load_lora", ctypes.byref(adapter))


def _c_text(value: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidParameterError(f"{name} must be a str, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidParameterError(f"{name} contains a NUL character")
    return value.encode("utf-8")


def _run_worker(state: _HandleState, run_id: int, channel: callback.RunChannel, inp: Any, infer: Any) -> None:
    rc, exc = -1, None
    try:
        rc = int(state.fns.rkllm_run(state.handle, ctypes.byref(inp), ctypes.byref(infer), run_id))
    except BaseException as e:  # surfaced to the consumer through the end marker
        exc = e
    finally:
        callback.close_channel(run_id)
        with state.mutex:
            state.current = None
            state.running = False
        state.lock.release()
        channel.put((END, rc, exc))
