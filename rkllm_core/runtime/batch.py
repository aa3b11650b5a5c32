"""Batched runs: several prompts decoded together in one native run, each read as a stream of its own.

A handle initialised with ``n_batch = N`` (``InitParams(n_batch=N)``) takes an array
of N inputs in one ``rkllm_run`` and reports every step for all slots at once. Decoding
is bound by memory bandwidth, so one step for N sequences costs little more than one
for a single sequence. :meth:`RKLLMRuntime.batch <rkllm_core.runtime.RKLLMRuntime.batch>`
starts such a run and returns a :class:`BatchRun` whose :attr:`~BatchRun.slots` are
per-prompt streams (sync and async iterators of
:class:`~rkllm_core.params.StreamChunk`, each with its own ``finish_reason`` and token
count).

Built strictly on the runtime's documented contract, with the safe reading where it
is silent:

* **keep_history is 0.** Whether a slot keeps its own conversation is undocumented, so a
  batched run always prefills each prompt in full and the handle's KV cache holds nothing
  a later request may reuse (its :class:`~rkllm_core.runtime.KVState` says so).
* **Every slot holds a valid input.** With fewer prompts than N the free slots get the
  **filler** prompt (:data:`FILLER_PROMPT`, or ``filler=``); their output is dropped and,
  if a filler outlives the real slots, the run is aborted as soon as they are done.
* **A slot ends at its own end.** Its first negative ``token_id`` ends its stream at once;
  NULL text is expected (a held-back UTF-8 character, a finished slot). The FINISH
  callback's shape is undocumented: only its first result is read, as the run's
  :attr:`~BatchRun.stats`; a slot's final chunk carries no stats.
* **One run per handle.** A batched run takes the handle's turn like any run: nobody else
  uses the handle until ``rkllm_run`` has returned; closing the runtime aborts it.

A slot whose consumer is gone (``close()``, ``break`` out of ``async for``, a cancelled
task, garbage collection) is *detached*: its tokens are dropped, and the run is aborted
only when no slot is wanted any more. :meth:`BatchRun.abort` stops every slot
(``finish_reason="abort"``). Sampling and ``max_new_tokens`` are shared by the slots (one
``RKLLMInferParam``); on the 1.2 ABI the binding ends each slot at ``max_new_tokens``
itself.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from ..errors import InvalidParameterError
from ..native.backend import RunRequest
from ..native.callback import BatchChannel, open_batch_channel
from ..params import FinishReason, PerfStats, SamplingParams, StreamChunk
from .run import ABORT_WAIT_S, Run, RunState

logger = logging.getLogger(__name__)

__all__ = ["FILLER_PROMPT", "BatchInput", "BatchOptions", "BatchRun", "BatchSlot", "SlotState", "plan_batch"]

FILLER_PROMPT = "Hi"
"""What fills the slots no prompt needs (the runtime expects N valid inputs): short, so it ends early."""


@dataclass(frozen=True, slots=True)
class BatchInput:
    """One slot's input when a plain prompt string is not enough.

    Attributes:
        prompt: the text (the runtime applies the model's chat template), or ``None`` with ``token_ids``.
        role: "user", or "tool" for function results.
        enable_thinking: switch the template's thinking mode (Qwen3).
        token_ids: token input instead of a prompt.
    """

    prompt: str | None = None
    role: Literal["user", "tool"] = "user"
    enable_thinking: bool = False
    token_ids: Sequence[int] | None = None


class BatchOptions(TypedDict, total=False):
    """Options every slot of a batched run shares (the runtime takes one ``RKLLMInferParam``)."""

    sampling: SamplingParams | None
    """Per-run sampling (1.3 only)."""
    max_new_tokens: int | None
    """The limit of each slot (the runtime's on 1.3; the binding's own on 1.2)."""
    lora: str | None
    """The name of a loaded LoRA adapter to apply."""


def plan_batch(
    request: Callable[..., RunRequest],
    prompts: Sequence[str | BatchInput],
    n_batch: int,
    filler: str,
    options: BatchOptions,
) -> list[RunRequest]:
    """Validate a batched run and return its ``n_batch`` requests: the prompts', then the fillers'.

    Args:
        request: validates one run (``_HandleState.request``: ``prompt, **RunOptions``).
        prompts: one per slot, at most ``n_batch``.
        n_batch: the handle's number of slots.
        filler: the prompt of the slots no prompt needs.
        options: shared by every slot.

    Raises:
        InvalidParameterError: no prompt, more prompts than slots, an empty filler, or a bad input.
    """
    if isinstance(prompts, str | bytes) or not 1 <= len(prompts) <= n_batch:
        raise InvalidParameterError(
            f"a batched run takes a sequence of 1 to {n_batch} prompts (the handle's n_batch), "
            f"got {prompts if isinstance(prompts, str | bytes) else len(prompts)!r}"
        )
    if not isinstance(filler, str) or not filler:
        raise InvalidParameterError("filler must be a non-empty prompt")
    reqs = []
    for item in prompts:
        one = item if isinstance(item, BatchInput) else BatchInput(item)
        if not isinstance(one.prompt, str | None):
            raise InvalidParameterError(f"a batch prompt must be a str or a BatchInput, got {one.prompt!r}")
        reqs.append(
            request(one.prompt, role=one.role, enable_thinking=one.enable_thinking, token_ids=one.token_ids, **options)
        )
    reqs.extend([request(filler, **options)] * (n_batch - len(prompts)))
    return reqs


class SlotState(enum.Enum):
    """Where a :class:`BatchSlot` is in its life."""

    STREAMING = 1
    """Chunks are being read (or waiting to be)."""
    DONE = 2
    """The last chunk was read, or the run failed."""
    DETACHED = 3
    """Its consumer let go before the end: its tokens are dropped."""


class BatchSlot(Iterator[StreamChunk], AsyncIterator[StreamChunk]):
    """One prompt's stream in a batched run: iterate it (``for`` or ``async for``) from one consumer.

    The last chunk has ``finish_reason`` set: ``"stop"``, ``"length"`` (this slot reached
    ``max_new_tokens``) or ``"abort"`` (:meth:`BatchRun.abort`). A failed run raises
    :class:`~rkllm_core.errors.RunError` once the text before the failure is out.
    Leaving early — :meth:`close`, ``break`` in ``async for`` followed by :meth:`aclose`,
    a cancelled task, an exception such as ``KeyboardInterrupt``, garbage collection —
    detaches the slot; the other slots go on. Nothing here waits for the run.
    """

    def __init__(self, channel: BatchChannel, index: int, run: Run) -> None:
        self.index = index
        """The slot's position in the run's input array."""
        self._channel = channel  # not the BatchRun: dropping every slot and the run must detach and abort
        self._run = run
        self._life = SlotState.STREAMING
        self._pieces: list[str] = []
        self._ready: deque[StreamChunk] = deque()

    @property
    def state(self) -> SlotState:
        """Where the slot is in its life."""
        return self._life

    @property
    def text(self) -> str:
        """All text yielded so far."""
        return "".join(self._pieces)

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the slot ended, once it has."""
        return self._run.finish_reason

    @property
    def tokens(self) -> int:
        """This slot's generated tokens delivered so far."""
        return self._run.tokens

    def detach(self) -> None:
        """Stop reading: drop this slot's tokens; the run is aborted once no slot is wanted (never waits)."""
        if self._life is SlotState.STREAMING:
            self._life = SlotState.DETACHED
            self._channel.detach(self.index)

    close = detach

    async def aclose(self) -> None:
        """Async :meth:`detach` (for ``contextlib.aclosing``)."""
        self.detach()

    def __enter__(self) -> BatchSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __iter__(self) -> BatchSlot:
        return self

    def __aiter__(self) -> BatchSlot:
        return self

    def __next__(self) -> StreamChunk:
        first = self._pending()
        if first is not None:
            return first
        channel = self._run.channel
        assert channel is not None
        try:
            while (first := self._accept(self._run.feed_many(channel.get_many()))) is None:
                pass
        except BaseException:
            self._failed()
            raise
        return first

    async def __anext__(self) -> StreamChunk:
        try:
            first = self._pending()
        except StopIteration:
            raise StopAsyncIteration from None
        if first is not None:
            return first
        channel = self._run.channel
        assert channel is not None
        try:
            while (first := self._accept(self._run.feed_many(await channel.get_many_async()))) is None:
                pass
        except BaseException:  # a cancelled task detaches its slot
            self._failed()
            raise
        return first

    def _pending(self) -> StreamChunk | None:
        """A chunk already decoded, or None to read more; raises at the end (or a deferred failure)."""
        if self._ready:
            return self._ready.popleft()
        if self._life is not SlotState.STREAMING:
            raise StopIteration
        if self._run.deferred is not None:
            self._life = SlotState.DONE
            raise self._run.deferred
        return None

    def _accept(self, chunks: list[StreamChunk]) -> StreamChunk | None:
        if not chunks:
            return None
        self._pieces.extend(c.text for c in chunks)
        if chunks[-1].finish_reason is not None:
            self._life = SlotState.DONE
        self._ready.extend(chunks[1:])
        return chunks[0]

    def _failed(self) -> None:
        if self._run.ended:  # the run failed and is over for this slot
            self._life = SlotState.DONE
        else:  # KeyboardInterrupt, a cancel and the like: this consumer is gone
            self.detach()

    def __del__(self) -> None:
        if self._life is SlotState.STREAMING:  # a slot dropped mid-run must not keep the run going for nobody
            try:
                self.detach()
            except Exception:  # pragma: no cover - interpreter teardown
                logger.debug("detaching a dropped slot failed", exc_info=True)


class BatchRun:
    """A started batched run: its slots' streams, abort, close and the runtime's stats.

    Made by :meth:`RKLLMRuntime.batch <rkllm_core.runtime.RKLLMRuntime.batch>` (or a
    session's :meth:`~rkllm_core.runtime.Session.batch`). ``with`` closes it: every slot
    is detached, the run aborted if still going, and the exit waits (bounded) until the
    runtime has returned. ``async with`` does the same without waiting.
    """

    def __init__(
        self,
        host: Run,
        n_prompts: int,
        n_batch: int,
        stop_after: int,
        abort: Callable[[Run], bool],
        abort_soon: Callable[[Run], None],
    ) -> None:
        self._host = host
        self._abort = abort
        runs = [Run(host.max_new_tokens, ()) for _ in range(n_batch)]

        def ended_by_run(slots: list[int]) -> None:  # references no slot: dropped slots must still detach
            for i in slots:
                runs[i].aborted = runs[i].aborted or host.aborted

        self.run_id, self.channel = open_batch_channel(n_batch, stop_after, lambda: abort_soon(host), ended_by_run)
        for run, channel in zip(runs, self.channel.slots, strict=True):
            run.channel = channel
            run.state = RunState.RUNNING
        self._runs = runs
        self.slots: tuple[BatchSlot, ...] = tuple(BatchSlot(self.channel, i, runs[i]) for i in range(n_prompts))
        """One stream per prompt, in the prompts' order."""
        self.fillers = n_batch - n_prompts
        """How many slots hold the filler prompt (their output is dropped)."""
        for i in range(n_prompts, n_batch):
            self.channel.detach(i)  # nobody reads a filler

    @property
    def n_batch(self) -> int:
        """The number of slots in the run (prompts and fillers)."""
        return len(self._runs)

    @property
    def returned(self) -> bool:
        """True once ``rkllm_run`` has returned."""
        return self._host.returned

    @property
    def stats(self) -> PerfStats | None:
        """The runtime's perf stats, as its closing callback reported them (its first result), once it has."""
        p = self.channel.perf
        if p is None:
            return None
        return PerfStats(
            float(p.prefill_time_ms),
            int(p.prefill_tokens),
            float(p.generate_time_ms),
            int(p.generate_tokens),
            float(p.memory_usage_mb),
        )

    def abort(self) -> bool:
        """Stop the whole run: every slot still going ends with ``finish_reason="abort"``. Does not wait.

        Returns:
            True if the run was still going.
        """
        return self._abort(self._host)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ``rkllm_run`` has returned; False if ``timeout`` seconds passed first."""
        return self._host.wait_returned(timeout)

    def close(self, timeout: float = ABORT_WAIT_S) -> None:
        """Detach every slot, abort the run if it is still going, and wait (bounded) until it has returned."""
        for slot in self.slots:
            slot.detach()
        self._abort(self._host)
        if not self._host.wait_returned(timeout):
            logger.error("a batched run did not return %.0f s after rkllm_abort", timeout)

    async def aclose(self) -> None:
        """Detach every slot (the run is aborted from the core's executor); never waits."""
        for slot in self.slots:
            slot.detach()

    def __enter__(self) -> BatchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> BatchRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
