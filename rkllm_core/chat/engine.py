"""The chat engine both adapters share: messages in, a stream of typed events out.

A request takes a lease on its model from the manager, then a session on the
handle (both in arrival order; both awaited without a thread in async code),
and inside that session:

1. plans it (:mod:`.planner`): reuse the KV cache when the handle says it holds
   exactly this conversation, else rebuild it — cleared, template installed,
   a long system prompt loaded from or saved to the prompt cache on disk;
2. runs it, feeding the runtime's chunks through the stream parsers
   (:mod:`.parse`): stop sequences, ``<think>`` reasoning, ``<tool_call>`` blocks;
3. finishes it: reads the real KV size, declares on the handle what its cache
   now holds (only after a clean end: a reply cut by a stop sequence, an abort
   or an error leaves the cache out of step with what the caller will send back,
   so the next request rebuilds), and reports usage.

The engine keeps no state about handles: what a KV cache holds lives on the
handle (:class:`~rkllm_core.runtime.KVState`), so any number of engines, adapters
and direct runtime calls can share a model without answering one conversation
in another's context. In async code the short native set-up calls run on the
core's own executor, never on the event loop; cancelling a request aborts its
generation and leaves every line it stood in at once.

**Batched models.** A model whose instance was loaded with ``n_batch`` > 1 (see
:doc:`batching`) serves each request through the handle's batch scheduler
(:mod:`rkllm_core.runtime.scheduler`): the request is planned as a rebuild (its whole
conversation, no KV reuse, no prompt cache — a batched run keeps no history; with a
ChatML template the earlier turns travel in the prompt, see
:meth:`~.planner.Planner.plan_batched`), queued with its group (chat setup, sampling,
``max_new_tokens``) and read from its own slot of a shared run. A lone request is a
batch of one plus filler slots: keeping a second, ``n_batch = 1`` instance for it would
hold the model's weights twice. Usage then says
``prefilled_tokens == input_tokens`` (estimated from the text: a slot gets no perf stats).

**Images.** A user message may carry images (:class:`~.messages.ImagePart`) for a
``vision`` model with an image encoder (see :mod:`.vision`): they are read, decoded and
checked before the model loads, encoded through the model's encoder (each distinct image
once while it stays in the process-wide :func:`~.vision.image_cache`), and sent with the run
in prompt order, one ``<image>`` each before the message's text. On runtime 1.2 the
family's image tags are set at init (the manager loads every vision model with an encoder
that way, so text and image requests share one instance); on 1.3 they go with each run.
A follow-up turn reuses the KV cache, images included. Batched (``n_batch`` > 1) models take no images yet.

Events: text and reasoning deltas, tool-call deltas and complete tool calls,
then one :class:`ChatDone` with the finish reason, the assistant message and
token usage.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._sync import Deadline, offload
from ..errors import InvalidParameterError, ModelKindError, NativeError
from ..models.manager import Lease, ModelManager, default_manager
from ..models.registry import CHAT_KINDS
from ..params import InitParams, PerfStats, StreamChunk
from ..runtime import BatchInput, Session
from ..runtime.scheduler import BatchPolicy, Ticket, scheduler_for
from .messages import ChatMessage, ToolCallRequest, append_instruction, validate_messages
from .options import ChatOptions, json_instruction
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
from .planner import PROMPT_CACHE_MIN_TOKENS, Plan, Planner
from .templates import estimate_tokens
from .vision import VisionRequest, vision_request

if TYPE_CHECKING:
    from .promptcache import PromptCacheStore

logger = logging.getLogger(__name__)

# What the engine serves: a request for an embedding or reranker model is refused before it loads.
_CHAT = (CHAT_KINDS, "the chat classes (ChatRKLLM, RKLLM, ChatEngine)")

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
    "collect",
    "acollect",
]

ChatFinishReason = Literal["stop", "length", "abort"]


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
    """The last event of a request, and the whole answer (:meth:`ChatEngine.chat` returns it)."""

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
    sampling_policy: str = "run"
    """How the request's sampling was served: ``run`` (per run, runtime 1.3), or on 1.2 the
    manager's :data:`~rkllm_core.params.SamplingPolicy` (``instance``, ``reload`` or ``fixed``:
    with ``fixed`` the model's own sampling was used, not the request's)."""

    @property
    def text(self) -> str:
        """The answer text."""
        return self.message.content

    def stats_dict(self) -> dict[str, float] | None:
        """The runtime's perf stats as a plain dict (for response metadata), or ``None``."""
        return asdict(self.stats) if self.stats is not None else None


ChatResponse = ChatDone
"""A whole answer: the :class:`ChatDone` event of the request."""

ChatEvent = TextDelta | ReasoningDelta | ToolCallDelta | ToolCall | InvalidToolCall | ChatDone


def collect(events: Iterable[ChatEvent]) -> ChatDone:
    """Consume a request's events and return its final :class:`ChatDone`."""
    done: ChatDone | None = None
    for event in events:
        if isinstance(event, ChatDone):
            done = event
    if done is None:  # pragma: no cover - the engine always ends with ChatDone
        raise InvalidParameterError("the event stream ended without ChatDone")
    return done


async def acollect(events: AsyncIterator[ChatEvent]) -> ChatDone:
    """Async :func:`collect` (closes the stream on the way out)."""
    done: ChatDone | None = None
    async with aclosing(events) as stream:  # type: ignore[type-var]
        async for event in stream:
            if isinstance(event, ChatDone):
                done = event
    if done is None:  # pragma: no cover - the engine always ends with ChatDone
        raise InvalidParameterError("the event stream ended without ChatDone")
    return done


class ChatEngine:
    """Runs chat requests on models from a :class:`~rkllm_core.models.manager.ModelManager`.

    This is the one way to chat with a model by name; the LangChain and LlamaIndex
    adapters use exactly it. It holds no conversation state (that lives on the
    model handles), so create as many as you like.

    Args:
        manager: where models come from (default: the process-wide manager).
        prompt_cache: a store for system-prompt caches; ``None`` uses the default
            directory, ``False`` disables the disk cache.
        prompt_cache_min_tokens: smallest (estimated) system prompt worth caching.
        reuse_kv: keep conversations in the KV cache between requests (turn off only
            to measure what re-prefilling every turn costs).
        batch_policy: when the batch scheduler of an ``n_batch`` model starts a run (its
            gather window); ``None`` keeps each handle's scheduler as it is (20 ms by default).
    """

    def __init__(
        self,
        manager: ModelManager | None = None,
        *,
        prompt_cache: PromptCacheStore | Literal[False] | None = None,
        prompt_cache_min_tokens: int = PROMPT_CACHE_MIN_TOKENS,
        reuse_kv: bool = True,
        batch_policy: BatchPolicy | None = None,
    ) -> None:
        self._manager = manager
        self._batch_policy = batch_policy
        self._batch_planner = Planner(None, prompt_cache_min_tokens=prompt_cache_min_tokens, reuse_kv=False)
        if prompt_cache is None:
            from .promptcache import PromptCacheStore

            prompt_cache = PromptCacheStore()
        self._store: PromptCacheStore | None = prompt_cache or None
        self._planner = Planner(self._store, prompt_cache_min_tokens=prompt_cache_min_tokens, reuse_kv=reuse_kv)

    @property
    def manager(self) -> ModelManager:
        """The model manager in use."""
        return self._manager if self._manager is not None else default_manager()

    @property
    def reuse_kv(self) -> bool:
        """Whether conversations are continued in the KV cache."""
        return self._planner.reuse_kv

    @property
    def prompt_cache(self) -> PromptCacheStore | None:
        """The system-prompt cache on disk, or ``None`` when disabled."""
        return self._store

    # -- public API -------------------------------------------------------------------------------
    def stream(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: ChatOptions | None = None,
        *,
        on_start: Callable[[bool], None] | None = None,
    ) -> Generator[ChatEvent, None, None]:
        """Answer ``messages`` with ``model``, yielding events; the last one is :class:`ChatDone`.

        Closing the iterator early aborts the generation. ``on_start``, when given, is called once
        the request is planned, before the run starts, with whether the KV cache is reused (what
        :attr:`ChatDone.kv_reused` will say): a server sends it in a stream's headers.

        Raises:
            InvalidParameterError: bad messages or options (nothing reaches the runtime).
            ModelKindError: ``model`` is an embedding or reranker model, or it gets images and is not a
                vision model with an image encoder (nothing is loaded).
            ImageError: an image cannot be read or decoded, or the runtime cannot take that many images in
                one prompt (nothing runs).
            ModelNotFoundError, ContextLengthError, BusyError, RunError: see their docs.
        """
        opts = options or ChatOptions()
        msgs = _request_messages(messages, opts)
        info = self.manager.resolve(model)
        vision = vision_request(info, msgs, opts)
        deadline = Deadline(opts.timeout)
        with self.manager.lease(model, _init_for(opts), timeout=deadline.remaining(), kinds=_CHAT) as lease:
            if _batched(lease):
                _refuse_batched_images(lease, vision)
                yield from self._stream_batched(lease, msgs, opts, deadline, on_start)
                return
            with lease.runtime.session(deadline.remaining()) as session:
                plan = self._prepare(session, lease, msgs, opts, vision)
                if on_start is not None:
                    on_start(plan.reuse)
                tracker = _Tracker(opts)
                try:
                    with session.stream(plan.prompt, **_run_kwargs(session, plan, opts)) as run:
                        for chunk in run:
                            yield from tracker.feed(chunk)
                            if tracker.take_stop_request():
                                run.abort()
                except BaseException:
                    self._discard(plan)
                    raise
                done = self._finish(session, lease, plan, tracker)
                yield from tracker.flushed
                yield done

    async def astream(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: ChatOptions | None = None,
        *,
        on_start: Callable[[bool], None] | None = None,
    ) -> AsyncGenerator[ChatEvent, None]:
        """Async version of :meth:`stream`; never blocks the event loop, cancellation aborts.

        Waiting for the model occupies no thread; loading it and the short native
        set-up calls run on the core's own executor.
        """
        opts = options or ChatOptions()
        msgs = _request_messages(messages, opts)
        info = self.manager.resolve(model)
        vision = await offload(vision_request, info, msgs, opts) if _has_images(msgs) else None
        deadline = Deadline(opts.timeout)
        async with self.manager.alease(model, _init_for(opts), timeout=deadline.remaining(), kinds=_CHAT) as lease:
            if _batched(lease):
                _refuse_batched_images(lease, vision)
                async with aclosing(self._astream_batched(lease, msgs, opts, deadline, on_start)) as batched:
                    async for event in batched:
                        yield event
                return
            async with lease.runtime.session(deadline.remaining()) as session:
                plan = await session.call(self._prepare, session, lease, msgs, opts, vision)
                if on_start is not None:
                    on_start(plan.reuse)
                tracker = _Tracker(opts)
                try:
                    chunks = session.astream(plan.prompt, **_run_kwargs(session, plan, opts))
                    async with aclosing(chunks) as run:  # type: ignore[type-var]
                        async for chunk in run:
                            for event in tracker.feed(chunk):
                                yield event
                            if tracker.take_stop_request():
                                session.abort_soon()
                except BaseException:
                    self._discard(plan)
                    raise
                done = await session.call(self._finish, session, lease, plan, tracker)
                for event in tracker.flushed:
                    yield event
                yield done

    def chat(self, model: str, messages: Sequence[ChatMessage], options: ChatOptions | None = None) -> ChatDone:
        """Answer ``messages`` and return the whole response."""
        return collect(self.stream(model, messages, options))

    async def achat(self, model: str, messages: Sequence[ChatMessage], options: ChatOptions | None = None) -> ChatDone:
        """Async version of :meth:`chat`."""
        return await acollect(self.astream(model, messages, options))

    def context_window(self, model: str) -> int:
        """The context size of ``model`` (from the registry)."""
        return self.manager.resolve(model).context_size

    # -- batched models -----------------------------------------------------------------------------
    def _submit(
        self, lease: Lease, msgs: list[ChatMessage], opts: ChatOptions, deadline: Deadline
    ) -> tuple[Plan, Ticket]:
        """Plan a batched request (a rebuild: the whole conversation) and queue it with the handle's scheduler."""
        rt = lease.runtime
        plan = self._batch_planner.plan_batched(rt.max_context_len, lease.info, msgs, opts)
        assert plan.setup is not None
        run = rt.library.backend.place_generation(None, opts.sampling, opts.max_new_tokens).run
        shared = {k: v for k, v in run.items() if k in ("sampling", "max_new_tokens")}
        item = BatchInput(plan.prompt, role=plan.role, enable_thinking=plan.native and plan.enable_thinking)
        lease.give_up_turn()  # the scheduler's dispatcher takes the handle's turns
        ticket = scheduler_for(rt, self._batch_policy).submit(
            item,
            group=(plan.setup, tuple(sorted((k, repr(v)) for k, v in shared.items()))),
            prepare=_installer(plan),
            options=shared,  # type: ignore[arg-type]
            timeout=deadline.remaining(),
        )
        return plan, ticket

    def _stream_batched(
        self,
        lease: Lease,
        msgs: list[ChatMessage],
        opts: ChatOptions,
        deadline: Deadline,
        on_start: Callable[[bool], None] | None,
    ) -> Generator[ChatEvent, None, None]:
        plan, ticket = self._submit(lease, msgs, opts, deadline)
        if on_start is not None:
            on_start(False)
        tracker = _Tracker(opts)
        with ticket.slot() as slot:  # leaving early detaches the slot; the other slots go on
            for chunk in slot:
                yield from tracker.feed(chunk)
                if tracker.take_stop_request():
                    break
        done = _batched_done(lease, plan, tracker)
        yield from tracker.flushed
        yield done

    async def _astream_batched(
        self,
        lease: Lease,
        msgs: list[ChatMessage],
        opts: ChatOptions,
        deadline: Deadline,
        on_start: Callable[[bool], None] | None,
    ) -> AsyncGenerator[ChatEvent, None]:
        plan, ticket = self._submit(lease, msgs, opts, deadline)
        if on_start is not None:
            on_start(False)
        tracker = _Tracker(opts)
        slot = await ticket.aslot()
        try:
            async for chunk in slot:
                for event in tracker.feed(chunk):
                    yield event
                if tracker.take_stop_request():
                    break
        finally:
            slot.detach()  # a cancelled or closed request leaves its slot; the run goes on for the others
        done = _batched_done(lease, plan, tracker)
        for event in tracker.flushed:
            yield event
        yield done

    # -- inside the session ----------------------------------------------------------------------
    def _prepare(
        self,
        session: Session,
        lease: Lease,
        msgs: list[ChatMessage],
        opts: ChatOptions,
        vision: VisionRequest | None = None,
    ) -> Plan:
        """Plan the request, encode its images and bring the handle to the plan's starting state."""
        rt = session.runtime
        plan = self._planner.plan(
            session.kv,
            rt.max_context_len,
            (rt.abi, rt.library.version or ""),
            lease.info,
            msgs,
            opts,
            image_tokens=_image_tokens(lease, vision),
            digests=vision.digests if vision is not None else None,
        )
        plan.image_run = _image_run(session, lease, plan, vision)  # before the handle changes: errors leave it
        if plan.reuse:
            return plan
        assert plan.setup is not None
        if session.kv.tokens != 0 or session.kv.tag is not None:
            session.clear_kv_cache()
        if session.chat_setup != plan.setup:
            plan.setup.install(session)
        wanted = str(plan.cache_load) if plan.cache_load is not None else None
        if session.prompt_cache is not None and session.prompt_cache != wanted:
            session.release_prompt_cache()
        if wanted is not None and session.prompt_cache != wanted:
            try:
                session.load_prompt_cache(wanted)
            except (NativeError, InvalidParameterError) as exc:
                assert self._store is not None and plan.cache_key is not None
                logger.warning("prompt cache %s could not be loaded (%s); rebuilding it", wanted, exc)
                self._store.invalidate(plan.cache_key, f"load failed: {exc}")
                plan.cache_load = None
                plan.cache_save = self._store.staging_path(plan.cache_key)
        return plan

    def _finish(self, session: Session, lease: Lease, plan: Plan, tracker: _Tracker) -> ChatDone:
        tracker.flush()
        final = tracker.final
        stats = final.stats if final is not None else None
        lease.record_stats(stats)
        try:
            kv_now: int | None = session.kv_cache_size()
        except NativeError as exc:
            logger.warning("cannot read the KV cache size of %s (%s); the next request rebuilds", lease.info.name, exc)
            kv_now = None
        generated = stats.generate_tokens if stats is not None else tracker.tokens
        message = tracker.message()
        reason = tracker.finish_reason()
        if plan.cache_save is not None and self._store is not None and plan.cache_key is not None:
            if final is not None and (final.finish_reason != "abort" or tracker.tokens > 0):  # prefill complete
                self._store.commit(plan.cache_key, plan.cache_save, extra={"model": lease.info.name})
            else:
                self._store.discard(plan.cache_save)
        if reason != "abort" and not tracker.pipeline.stopped and final is not None and kv_now is not None:
            session.mark_kv(plan.tag_after(message), kv_now)
        prefilled = stats.prefill_tokens if stats is not None else 0
        if kv_now:
            input_tokens = max(kv_now - generated, prefilled)
        else:
            input_tokens = prefilled + plan.kv_before
        if stats is None:  # a run cut short (stop sequence, the binding's limit): the runtime reported nothing
            prefilled = max(0, input_tokens - plan.kv_before)
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
            sampling_policy=lease.sampling_policy,
        )

    def _discard(self, plan: Plan) -> None:
        if plan.cache_save is not None and self._store is not None:
            self._store.discard(plan.cache_save)


def _batched(lease: Lease) -> bool:
    """True when the leased instance runs batched (``n_batch`` > 1): its requests go through the scheduler."""
    return (lease.runtime.params.n_batch or 1) > 1


def _installer(plan: Plan) -> Callable[[Session], None]:
    """What brings a batched handle to the plan's setup before its run (skipped when already installed)."""
    setup = plan.setup
    assert setup is not None

    def install(session: Session) -> None:
        if session.chat_setup != setup:
            setup.install(session)

    return install


def _batched_done(lease: Lease, plan: Plan, tracker: _Tracker) -> ChatDone:
    """The last event of a batched request: its own finish reason; usage from the text (a slot has no stats)."""
    tracker.flush()
    assert plan.setup is not None
    input_tokens = estimate_tokens("".join(plan.setup.parts)) + estimate_tokens(plan.prompt)
    usage = Usage(input_tokens, tracker.tokens, input_tokens + tracker.tokens, input_tokens)
    return ChatDone(
        finish_reason=tracker.finish_reason(),
        message=tracker.message(),
        reasoning=tracker.pipeline.reasoning,
        usage=usage,
        stats=None,
        model=lease.info.name,
        invalid_tool_calls=tuple(tracker.pipeline.invalid_tool_calls),
        kv_reused=False,
        sampling_policy=lease.sampling_policy,
    )


def _request_messages(messages: Sequence[ChatMessage], opts: ChatOptions) -> list[ChatMessage]:
    msgs = validate_messages(messages)
    if opts.response_format is not None:
        msgs = append_instruction(msgs, json_instruction(opts.response_format))
    return msgs


def _init_for(opts: ChatOptions) -> InitParams | None:
    """The request's sampling as init settings (what may select an instance); its limit goes with the run.

    On runtime 1.2 the manager adds a vision model's image tags to every instance's init settings.
    """
    return None if opts.sampling is None else InitParams(sampling=opts.sampling)


def _has_images(msgs: Sequence[ChatMessage]) -> bool:
    return any(m.images for m in msgs)


def _refuse_batched_images(lease: Lease, vision: VisionRequest | None) -> None:
    """Batched runs take no images yet: refuse them before the request is queued."""
    if vision is not None:
        raise InvalidParameterError(
            f"{lease.info.name} runs batched (n_batch {lease.runtime.params.n_batch}), and batched runs take no "
            "images yet: load it with n_batch = 1 to send images"
        )


def _image_tokens(lease: Lease, vision: VisionRequest | None) -> int:
    """Tokens one image takes: the loaded encoder's geometry (else the family's figure)."""
    if vision is None:
        return 0
    encoder = lease.encoder
    return encoder.geometry.n_tokens if encoder is not None else vision.family.tokens_per_image


def _image_run(session: Session, lease: Lease, plan: Plan, vision: VisionRequest | None) -> dict[str, Any]:
    """The run's image arguments: the plan's images checked against the runtime, encoded, in prompt order."""
    if not plan.images:
        return {}
    encoder = lease.encoder
    if vision is None or encoder is None:
        raise ModelKindError(f"{lease.info.name} has no image encoder loaded, so it takes no images")
    family = vision.family
    session.runtime.check_images(len(plan.images), multi_image_abi12=family.multi_image_abi12, family=family.name)
    kwargs: dict[str, Any] = {
        "images": vision.embeddings(plan.images, encoder),
        "image_size": (encoder.geometry.height, encoder.geometry.width),
        "image_digests": [vision.digests[image.key()] for image in plan.images],
        "multi_image_abi12": family.multi_image_abi12,
    }
    if session.runtime.abi != "1.2":
        kwargs["image_tags"] = vision.tags  # 1.2 took them at init
    return kwargs


def _run_kwargs(session: Session, plan: Plan, opts: ChatOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"role": plan.role, "keep_history": True}
    if plan.native:
        kwargs["enable_thinking"] = plan.enable_thinking  # the built-in template's own switch
    backend = session.runtime.library.backend
    kwargs.update(backend.place_generation(None, opts.sampling, opts.max_new_tokens).run)
    if plan.cache_save is not None:
        kwargs["save_prompt_cache"] = plan.cache_save
    kwargs.update(plan.image_run)
    return kwargs


class _Tracker:
    """Feeds runtime chunks through the stream pipeline and remembers the outcome."""

    def __init__(self, opts: ChatOptions) -> None:
        self.pipeline = StreamPipeline(
            stops=opts.stop, enable_thinking=opts.enable_thinking, parse_tools=bool(opts.active_tools)
        )
        self.final: StreamChunk | None = None
        self.tokens = 0
        self.flushed: list[_StreamEvent] = []
        self._flushed = False
        self._abort_sent = False

    def take_stop_request(self) -> bool:
        """True once, when a stop sequence was hit and the run must be aborted (False from then on)."""
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
