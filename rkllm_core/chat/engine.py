"""The chat engine both adapters share: messages in, a stream of typed events out.

Per runtime handle the engine remembers which conversation is in the KV cache
(the fingerprints of its messages, the system prompt, tools and template).

* When a request *extends* that conversation — same setup, same earlier
  turns including the assistant reply the model produced — only the new user /
  tool messages are sent, with ``keep_history=1``.
* Otherwise the KV cache is cleared and the conversation rebuilt (see
  :mod:`rkllm_core.chat.templates` for how earlier assistant turns are rendered).
  For a fresh conversation with a long system prompt, the prefill of the
  system prompt is cached on disk (:mod:`rkllm_core.chat.promptcache`) and loaded
  on later runs, also after a restart.
* A reply cut by a stop sequence, an abort, an error or a context shift
  leaves the KV cache out of step with what the caller will send back, so the
  next request rebuilds.
* Context: the KV size is read from the runtime after every run. If the new
  input plus a reserve for the answer would not fit, the conversation is
  rebuilt with its oldest turns dropped (the system prompt and the latest
  input always stay); if even that cannot fit, ``ContextLengthError``.

Events: text and reasoning deltas, tool-call deltas and complete tool calls
(from :mod:`rkllm_core.chat.parse`), then one :class:`ChatDone` with the
finish reason, the assistant message and token usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .._sync import FifoLock
from ..errors import BusyError, ContextLengthError, InvalidParameterError, NativeError
from ..models.manager import Lease, ModelManager, default_manager
from ..models.registry import ModelInfo
from ..params import InitParams, PerfStats, StreamChunk
from ..runtime.handle import RKLLMRuntime, RunStream
from .messages import ChatMessage, ChatOptions, ToolCallRequest, normalise_tools, validate_messages
from .parse import (
    Event,
    InvalidToolCall,
    ReasoningDelta,
    StopHit,
    StreamPipeline,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)
from .templates import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatMLTemplate,
    estimate_tokens,
    render_transcript,
    template_for_family,
)

if TYPE_CHECKING:
    from .promptcache import CacheKey, PromptCacheStore

logger = logging.getLogger(__name__)

__all__ = [
    "ChatDone",
    "ChatEngine",
    "ChatEvent",
    "ChatResponse",
    "InvalidToolCall",
    "ReasoningDelta",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "shared_engine",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_OUTPUT_RESERVE = 256
"""Tokens kept free for the answer when ``max_new_tokens`` is not set."""
PROMPT_CACHE_MIN_TOKENS = 64
"""System prompts estimated shorter than this are not worth a cache file."""

ChatFinishReason = Literal["stop", "length", "abort"]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request.

    Attributes:
        input_tokens: the whole context the answer was conditioned on.
        output_tokens: generated tokens.
        total_tokens: input plus output.
        prefilled_tokens: input tokens the NPU actually processed for this request
            (the rest came from the KV cache or a prompt cache).
    """

    input_tokens: int
    output_tokens: int
    total_tokens: int
    prefilled_tokens: int

    @property
    def cached_tokens(self) -> int:
        """Input tokens served from the KV cache or a prompt cache."""
        return max(0, self.input_tokens - self.prefilled_tokens)


@dataclass(frozen=True, slots=True)
class ChatDone:
    """The last event of a request."""

    finish_reason: ChatFinishReason
    message: ChatMessage
    """The assistant message (answer text and tool calls), as it should be sent back next turn."""
    reasoning: str
    usage: Usage
    stats: PerfStats | None
    model: str
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()
    kv_reused: bool = False
    """True when the request extended the conversation already in the KV cache."""


ChatEvent = TextDelta | ReasoningDelta | ToolCallDelta | ToolCall | InvalidToolCall | ChatDone


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """A whole answer (see :meth:`ChatEngine.chat`)."""

    message: ChatMessage
    reasoning: str
    finish_reason: ChatFinishReason
    usage: Usage
    stats: PerfStats | None
    model: str
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()
    kv_reused: bool = False


@dataclass
class _HandleConversation:
    """What the engine knows about one runtime handle's KV cache."""

    lock: FifoLock = field(default_factory=FifoLock)
    setup: tuple[Any, ...] | None = None  # (kind, system slot/prompt, tools, prefix, postfix) installed
    setup_key: tuple[Any, ...] | None = None  # the conversation setup the KV cache belongs to
    kv_fingerprints: list[tuple[Any, ...]] = field(default_factory=list)
    kv_tokens: int = 0
    dirty: bool = True  # the KV cache holds something no fingerprint list describes
    loaded_cache: str | None = None  # digest of the loaded prompt cache


@dataclass
class _Plan:
    reuse: bool
    prompt: str
    role: Literal["user", "tool"]
    enable_thinking: bool
    setup: tuple[Any, ...]
    setup_key: tuple[Any, ...]
    kv_after: list[tuple[Any, ...]]  # fingerprints in the KV cache once the input is prefilled
    cache_key: CacheKey | None = None
    cache_load: Path | None = None
    cache_save: Path | None = None
    dropped_turns: int = 0


class ChatEngine:
    """Runs chat requests on models from a :class:`~rkllm_core.models.manager.ModelManager`.

    Args:
        manager: where models come from (default: the process-wide manager).
        prompt_cache: a store for system-prompt caches; ``None`` uses the default
            directory, ``False`` disables the disk cache.
        prompt_cache_min_tokens: smallest (estimated) system prompt worth caching.
        reuse_kv: keep conversations in the KV cache between requests (turn off only
            to measure what re-prefilling every turn costs).
    """

    def __init__(
        self,
        manager: ModelManager | None = None,
        *,
        prompt_cache: PromptCacheStore | Literal[False] | None = None,
        prompt_cache_min_tokens: int = PROMPT_CACHE_MIN_TOKENS,
        reuse_kv: bool = True,
    ) -> None:
        self._manager = manager
        self._store: PromptCacheStore | None
        if prompt_cache is None:
            from .promptcache import PromptCacheStore

            prompt_cache = PromptCacheStore()
        self._store = prompt_cache or None
        self.prompt_cache_min_tokens = prompt_cache_min_tokens
        self.reuse_kv = reuse_kv
        self._states: weakref.WeakKeyDictionary[RKLLMRuntime, _HandleConversation] = weakref.WeakKeyDictionary()
        self._states_lock = threading.Lock()

    @property
    def manager(self) -> ModelManager:
        """The model manager in use."""
        return self._manager if self._manager is not None else default_manager()

    # -- public API -------------------------------------------------------------------------------
    def stream(
        self, model: str, messages: Sequence[ChatMessage], options: ChatOptions | None = None
    ) -> Generator[ChatEvent, None, None]:
        """Answer ``messages`` with ``model``, yielding events; the last one is :class:`ChatDone`.

        Closing the iterator early aborts the generation.

        Raises:
            InvalidParameterError: bad messages or options (nothing reaches the runtime).
            ModelNotFoundError, ContextLengthError, BusyError, RunError: see their docs.
        """
        opts = options or ChatOptions()
        msgs = validate_messages(messages)
        tools_json = normalise_tools(opts.active_tools) if opts.active_tools else ""
        lease = self._lease(model, opts)
        try:
            rt = lease.runtime
            conv = self._conversation(rt)
            if not conv.lock.acquire(opts.timeout):
                raise BusyError(f"{model} stayed busy for {opts.timeout} s")
            try:
                plan = self._plan(conv, rt, lease.info, msgs, opts, tools_json)
                stream = self._start(conv, rt, lease, plan, opts)
                yield from self._consume(conv, rt, lease, plan, opts, stream)
            finally:
                conv.lock.release()
        finally:
            lease.release()

    async def astream(
        self, model: str, messages: Sequence[ChatMessage], options: ChatOptions | None = None
    ) -> AsyncIterator[ChatEvent]:
        """Async version of :meth:`stream`; never blocks the event loop, cancellation aborts.

        Loading a model and the short native set-up calls run in a worker thread.
        """
        opts = options or ChatOptions()
        msgs = validate_messages(messages)
        tools_json = normalise_tools(opts.active_tools) if opts.active_tools else ""
        lease = await _in_thread(self._lease, model, opts, on_orphan=Lease.release)
        try:
            rt = lease.runtime
            conv = self._conversation(rt)
            if not await conv.lock.acquire_async(opts.timeout):
                raise BusyError(f"{model} stayed busy for {opts.timeout} s")
            try:
                plan = await _in_thread(self._plan, conv, rt, lease.info, msgs, opts, tools_json)
                await _in_thread(self._apply_setup, conv, rt, plan)
                tracker = _Tracker(plan, opts)
                try:
                    async for chunk in rt.astream(plan.prompt, **self._run_kwargs(rt, plan, opts)):
                        for event in tracker.feed(chunk):
                            yield event
                        if tracker.stop_requested:
                            rt.abort()
                except BaseException:
                    conv.dirty = True
                    raise
                done = await _in_thread(self._finish, conv, rt, lease, plan, tracker)
                for event in tracker.flushed:
                    yield event
                yield done
            finally:
                conv.lock.release()
        finally:
            lease.release()

    def chat(self, model: str, messages: Sequence[ChatMessage], options: ChatOptions | None = None) -> ChatResponse:
        """Answer ``messages`` and return the whole response."""
        done: ChatDone | None = None
        for event in self.stream(model, messages, options):
            if isinstance(event, ChatDone):
                done = event
        assert done is not None
        return _response(done)

    async def achat(
        self, model: str, messages: Sequence[ChatMessage], options: ChatOptions | None = None
    ) -> ChatResponse:
        """Async version of :meth:`chat`."""
        done: ChatDone | None = None
        async for event in self.astream(model, messages, options):
            if isinstance(event, ChatDone):
                done = event
        assert done is not None
        return _response(done)

    def context_window(self, model: str) -> int:
        """The context size of ``model`` (from the registry)."""
        return self.manager.resolve(model).context_size

    # -- internals ----------------------------------------------------------------------------------
    def _lease(self, model: str, opts: ChatOptions) -> Lease:
        init = None
        if opts.sampling is not None or opts.max_new_tokens is not None:
            # On 1.2 these pick the instance (fixed at init); on 1.3 the manager ignores them.
            init = InitParams(sampling=opts.sampling or InitParams().sampling, max_new_tokens=opts.max_new_tokens)
        return self.manager.lease(model, init, timeout=opts.timeout)

    def _conversation(self, rt: RKLLMRuntime) -> _HandleConversation:
        with self._states_lock:
            conv = self._states.get(rt)
            if conv is None:
                conv = self._states[rt] = _HandleConversation()
            return conv

    def _plan(
        self,
        conv: _HandleConversation,
        rt: RKLLMRuntime,
        info: ModelInfo,
        msgs: list[ChatMessage],
        opts: ChatOptions,
        tools_json: str,
    ) -> _Plan:
        system = "\n\n".join(m.content for m in msgs if m.role == "system") or (
            info.defaults.system_prompt or DEFAULT_SYSTEM_PROMPT
        )
        turns = [m for m in msgs if m.role != "system"]
        last_assistant = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=-1)
        history, inputs = turns[: last_assistant + 1], turns[last_assistant + 1 :]
        template = template_for_family(info.facts.family) if info.defaults.chat_template is None else None
        thinking = bool(opts.enable_thinking)
        setup_key = (template.name if template else "native", system, tools_json, thinking if template else None)
        reserve = opts.max_new_tokens or DEFAULT_OUTPUT_RESERVE
        limit = rt.max_context_len
        prompt, role = self._render_inputs(template, inputs, opts)
        input_tokens = estimate_tokens(prompt) + MESSAGE_OVERHEAD_TOKENS * len(inputs)
        fingerprints = [m.fingerprint() for m in history]
        kv_after = fingerprints + [m.fingerprint() for m in inputs]
        if (
            self.reuse_kv
            and not conv.dirty
            and conv.setup_key == setup_key
            and conv.kv_fingerprints == fingerprints
            and conv.kv_tokens + input_tokens + reserve <= limit
        ):
            return _Plan(True, prompt, role, thinking, conv.setup or (), setup_key, kv_after)

        # Rebuild: drop the oldest turns until the rendered conversation fits.
        tools_list = (
            [json.dumps(t, ensure_ascii=False, sort_keys=True) for t in json.loads(tools_json)] if tools_json else []
        )
        dropped = 0
        while True:
            if template is not None:
                slot = template.system_block(system, tools_list) + template.render_turns(history)
                setup: tuple[Any, ...] = ("template", slot, template.prefix(), template.postfix(thinking))
            else:
                slot = system + ("\n\n" + render_transcript(history) if history else "")
                setup = ("tools", slot, tools_json or "[]", "tool_response")
            needed = estimate_tokens("".join(str(s) for s in setup[1:])) + input_tokens + reserve
            if needed <= limit or not history:
                break
            cut = next((i for i in range(1, len(history)) if history[i].role == "user"), len(history))
            history = history[cut:]
            dropped += cut
        if needed > limit:
            raise ContextLengthError(
                f"the prompt needs about {needed - reserve} tokens plus {reserve} for the answer, more than the "
                f"{limit}-token context of {info.name}; shorten the system prompt or the last message, or lower "
                "max_new_tokens",
                requested=needed,
                limit=limit,
            )
        if dropped:
            logger.info("conversation too long for %s: rebuilt without its %d oldest messages", info.name, dropped)
        plan = _Plan(
            False,
            prompt,
            role,
            thinking,
            setup,
            setup_key,
            [m.fingerprint() for m in history] + [m.fingerprint() for m in inputs],
            dropped_turns=dropped,
        )
        if self._store is not None and not history and estimate_tokens(slot) >= self.prompt_cache_min_tokens:
            lib = rt.library
            key = self._store.make_key(
                info.path,
                setup="\x1f".join(str(s) for s in setup),
                abi=lib.abi,
                runtime=lib.version or "",
                thinking=str(thinking),
            )
            plan.cache_key = key
            found = self._store.lookup(key)
            if found is not None:
                plan.cache_load = found
            else:
                plan.cache_save = self._store.staging_path(key)
        return plan

    @staticmethod
    def _render_inputs(
        template: ChatMLTemplate | None, inputs: Sequence[ChatMessage], opts: ChatOptions
    ) -> tuple[str, Literal["user", "tool"]]:
        names = [n for n in opts.tool_names()] if opts.active_tools else []
        force = ""
        if opts.tool_choice in ("required", "any") and names:
            force = "\n\nAnswer by calling one of the tools: " + ", ".join(names) + "."
        elif opts.tool_choice and opts.tool_choice in names:
            force = f"\n\nAnswer by calling the tool `{opts.tool_choice}`."
        if template is not None:
            return template.user_text(inputs) + force, "user"
        if all(m.role == "tool" for m in inputs) and not force:
            results = [_json_or_text(m.content) for m in inputs]
            return json.dumps(results, ensure_ascii=False), "tool"
        parts = [
            f"<tool_response>\n{m.content}\n</tool_response>"
            if m.role == "tool"
            else (f"{m.name}: {m.content}" if m.name else m.content)
            for m in inputs
        ]
        return "\n\n".join(parts) + force, "user"

    def _apply_setup(self, conv: _HandleConversation, rt: RKLLMRuntime, plan: _Plan) -> None:
        """Bring the handle to the plan's starting state (called with the conversation lock held)."""
        if plan.reuse:
            return
        conv.dirty = True
        if conv.kv_tokens or conv.setup is not None:
            rt.clear_kv_cache(keep_system_prompt=False)
        conv.kv_tokens, conv.kv_fingerprints = 0, []
        if conv.setup != plan.setup:
            if plan.setup[0] == "template":
                rt.set_chat_template(plan.setup[1], plan.setup[2], plan.setup[3])
            else:
                rt.set_function_tools(plan.setup[1], plan.setup[2], plan.setup[3])
            conv.setup = plan.setup
        wanted = plan.cache_key.digest if plan.cache_key is not None and plan.cache_load is not None else None
        if conv.loaded_cache is not None and conv.loaded_cache != wanted:
            rt.release_prompt_cache()
            conv.loaded_cache = None
        if wanted is not None and conv.loaded_cache != wanted:
            assert self._store is not None and plan.cache_key is not None
            path = plan.cache_load
            assert path is not None
            try:  # a file the store returned is complete; if it vanished since, that is a miss
                rt.load_prompt_cache(path)
                conv.loaded_cache = wanted
            except (NativeError, InvalidParameterError) as exc:
                logger.warning("prompt cache %s could not be loaded (%s); rebuilding it", path, exc)
                self._store.invalidate(plan.cache_key, f"load failed: {exc}")
                plan.cache_load = None
                plan.cache_save = self._store.staging_path(plan.cache_key)

    def _run_kwargs(self, rt: RKLLMRuntime, plan: _Plan, opts: ChatOptions) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"role": plan.role, "keep_history": True}
        if plan.setup and plan.setup[0] == "tools":
            kwargs["enable_thinking"] = plan.enable_thinking  # native template: the runtime's switch
        if rt.abi == "1.3":
            if opts.sampling is not None:
                kwargs["sampling"] = opts.sampling
            if opts.max_new_tokens is not None:
                kwargs["max_new_tokens"] = opts.max_new_tokens
        if plan.cache_save is not None:
            kwargs["save_prompt_cache"] = plan.cache_save
        return kwargs

    def _start(
        self, conv: _HandleConversation, rt: RKLLMRuntime, lease: Lease, plan: _Plan, opts: ChatOptions
    ) -> RunStream:
        self._apply_setup(conv, rt, plan)
        return rt.stream(plan.prompt, timeout=opts.timeout, **self._run_kwargs(rt, plan, opts))

    def _consume(
        self,
        conv: _HandleConversation,
        rt: RKLLMRuntime,
        lease: Lease,
        plan: _Plan,
        opts: ChatOptions,
        stream: RunStream,
    ) -> Iterator[ChatEvent]:
        tracker = _Tracker(plan, opts)
        try:
            with stream:
                for chunk in stream:
                    yield from tracker.feed(chunk)
                    if tracker.stop_requested:
                        stream.abort()
        except BaseException:
            conv.dirty = True
            raise
        done = self._finish(conv, rt, lease, plan, tracker)
        yield from tracker.flushed
        yield done

    def _finish(
        self, conv: _HandleConversation, rt: RKLLMRuntime, lease: Lease, plan: _Plan, tracker: _Tracker
    ) -> ChatDone:
        tracker.flush()
        final = tracker.final
        stats = final.stats if final is not None else None
        lease.record_stats(stats)
        try:
            kv_now = rt.kv_cache_size()
        except NativeError:
            kv_now = 0
        generated = stats.generate_tokens if stats is not None else tracker.tokens
        message = tracker.message()
        reason = tracker.finish_reason()
        clean = reason != "abort" and not tracker.pipeline.stopped and final is not None
        if plan.cache_save is not None:
            assert self._store is not None and plan.cache_key is not None
            self._store.commit(plan.cache_key, plan.cache_save, extra={"model": lease.info.name})
        conv.setup_key = plan.setup_key
        if clean:
            conv.kv_fingerprints = plan.kv_after + [message.fingerprint()]
            conv.kv_tokens = kv_now
            conv.dirty = False
        else:
            conv.dirty = True
            conv.kv_tokens = kv_now
        input_tokens = (
            max(kv_now - generated, stats.prefill_tokens if stats else 0)
            if kv_now
            else (stats.prefill_tokens if stats else 0)
        )
        prefilled = stats.prefill_tokens if stats is not None else 0
        usage = Usage(input_tokens, generated, input_tokens + generated, prefilled)
        return ChatDone(
            finish_reason=reason,
            message=message,
            reasoning=tracker.pipeline.reasoning,
            usage=usage,
            stats=stats,
            model=lease.info.name,
            invalid_tool_calls=tuple(tracker.pipeline.invalid_tool_calls),
            kv_reused=plan.reuse,
        )


async def _in_thread(fn: Callable[..., _T], *args: Any, on_orphan: Callable[[_T], object] | None = None) -> _T:
    """Run ``fn`` in a worker thread.

    If the caller is cancelled meanwhile, the call still finishes before the
    cancellation propagates (so no lock is released under a running native
    call), and ``on_orphan`` disposes of its result (e.g. releases a lease).
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError as cancelled:
        try:
            result = await asyncio.shield(task)
        except BaseException:  # the call failed or we were cancelled again: nothing to dispose of
            raise cancelled from None
        if on_orphan is not None:
            on_orphan(result)
        raise


class _Tracker:
    """Feeds runtime chunks through the stream pipeline and remembers the outcome."""

    def __init__(self, plan: _Plan, opts: ChatOptions) -> None:
        self.pipeline = StreamPipeline(
            stops=opts.stop, enable_thinking=opts.enable_thinking, parse_tools=bool(opts.active_tools)
        )
        self.final: StreamChunk | None = None
        self.tokens = 0
        self.flushed: list[_StreamEvent] = []
        self._flushed = False
        self._abort_sent = False

    @property
    def stop_requested(self) -> bool:
        """True once, when a stop sequence was hit and the run must be aborted."""
        if self.pipeline.stopped and self.final is None and not self._abort_sent:
            self._abort_sent = True
            return True
        return False

    def feed(self, chunk: StreamChunk) -> list[_StreamEvent]:
        self.tokens += chunk.n_tokens
        events = self.pipeline.feed(chunk.text) if chunk.text and not self.pipeline.stopped else []
        if chunk.finish_reason is not None:
            self.final = chunk
        return _visible(events)

    def flush(self) -> None:
        if not self._flushed:
            self._flushed = True
            self.flushed = _visible(self.pipeline.flush())

    def finish_reason(self) -> ChatFinishReason:
        if self.pipeline.stopped:
            return "stop"
        if self.final is None:
            return "abort"
        reason = self.final.finish_reason
        return "length" if reason == "length" else "abort" if reason == "abort" else "stop"

    def message(self) -> ChatMessage:
        calls = tuple(ToolCallRequest(c.id, c.name, c.arguments) for c in self.pipeline.tool_calls)
        return ChatMessage("assistant", self.pipeline.text, tool_calls=calls)


_StreamEvent = TextDelta | ReasoningDelta | ToolCallDelta | ToolCall | InvalidToolCall


def _visible(events: list[Event]) -> list[_StreamEvent]:
    """Drop the pipeline's internal StopHit markers."""
    return [e for e in events if not isinstance(e, StopHit)]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _response(done: ChatDone) -> ChatResponse:
    return ChatResponse(
        message=done.message,
        reasoning=done.reasoning,
        finish_reason=done.finish_reason,
        usage=done.usage,
        stats=done.stats,
        model=done.model,
        invalid_tool_calls=done.invalid_tool_calls,
        kv_reused=done.kv_reused,
    )


_engines: weakref.WeakKeyDictionary[ModelManager, ChatEngine] = weakref.WeakKeyDictionary()
_managers: dict[tuple[str | None, str | None], ModelManager] = {}
_shared_lock = threading.Lock()


def shared_engine(
    *,
    manager: ModelManager | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    library_path: str | os.PathLike[str] | None = None,
) -> ChatEngine:
    """The engine for a manager, shared by every caller that uses that manager.

    KV-cache reuse works across objects only if they share one engine, so the
    adapters get theirs here: for an explicit ``manager``; for a
    ``model_dir``/``library_path`` pair (one manager per distinct pair); or,
    with neither, for the process-wide default manager.
    """
    with _shared_lock:
        if manager is None:
            if model_dir is None and library_path is None:
                manager = default_manager()
            else:
                key = (
                    os.fspath(model_dir) if model_dir is not None else None,
                    os.fspath(library_path) if library_path is not None else None,
                )
                manager = _managers.get(key)
                if manager is None:
                    from ..models.registry import ModelRegistry

                    registry = ModelRegistry([Path(model_dir)]) if model_dir is not None else None
                    manager = _managers[key] = ModelManager(registry, library=library_path)
        engine = _engines.get(manager)
        if engine is None:
            engine = _engines[manager] = ChatEngine(manager)
        return engine
