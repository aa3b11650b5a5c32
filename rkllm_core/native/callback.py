"""The one result callback handed to the runtime, and the per-run channels it feeds.

A single module-level ``CFUNCTYPE`` object lives for the whole process, so
the runtime can never call a collected callback. It routes by ``userdata``
(a run id) to that run's :class:`RunChannel`. It only copies bytes out of the
``RKLLMResult`` (whose pointers are valid only during the call) into a queue;
it never raises and always returns an int.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .structs import (
    LLMCallState,
    LLMResultCallback,
    RKLLMPerfStat,
    RKLLMResult,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    field_offset,
)

NORMAL = int(LLMCallState.RKLLM_RUN_NORMAL)
WAITING = int(LLMCallState.RKLLM_RUN_WAITING)
FINISH = int(LLMCallState.RKLLM_RUN_FINISH)
ERROR = int(LLMCallState.RKLLM_RUN_ERROR)
END = -1
"""Posted by the worker when ``rkllm_run`` has returned: ``(END, return_code, exception)``."""
TENSOR = -2
"""A copy of the hidden states or logits of a NORMAL callback: ``(TENSOR, bytes, rows, cols)``."""
LIMIT = -3
"""Posted after the token that reached the binding's own limit (``stop_after``): ``(LIMIT,)``."""
HIDDEN = 1
"""``RunChannel.tensor`` for a run in ``RKLLM_INFER_GET_LAST_HIDDEN_LAYER`` mode: every row is copied."""
LOGITS = 2
"""``RunChannel.tensor`` for a run in ``RKLLM_INFER_GET_LOGITS`` mode: the last row is copied."""

logger = logging.getLogger(__name__)

_COALESCE_S = 0.005
_FAST_GAP_S = 0.001

_TEXT_OFFSET = field_offset(RKLLMResult, "text")
_TOKEN_OFFSET = field_offset(RKLLMResult, "token_id")
_PERF_OFFSET = field_offset(RKLLMResult, "perf")

_HIDDEN_OFFSET = field_offset(RKLLMResult, "last_hidden_layer")
_LOGITS_OFFSET = field_offset(RKLLMResult, "logits")

_PERF_SIZE = ctypes.sizeof(RKLLMPerfStat)
_RESULT_SIZE = ctypes.sizeof(RKLLMResult)
"""The stride of the result array a batched run's callback receives."""
_string_at = ctypes.string_at


class RunChannel:
    """Carries one run's events from the runtime thread to its consumer.

    Items are tuples: ``(NORMAL, bytes, token_id)``, ``(WAITING, token_id)``,
    ``(FINISH, RKLLMPerfStat copy)``, ``(ERROR,)`` and finally
    ``(END, return_code, exception_or_None)``; in a hidden-state or logits run
    (``tensor`` set) a NORMAL callback carrying a buffer posts
    ``(TENSOR, float32 bytes, rows, cols)`` instead.

    An async consumer registers a waker; the producer calls it only when the
    consumer is parked, so the common case costs one queue put.

    With ``stop_after`` (the binding's own limit, for runtimes that fix
    ``max_new_tokens`` at init) the callback counts tokens: after the last one
    it posts ``(LIMIT,)`` and calls ``on_limit`` (which must not block: it
    schedules the abort), and drops any token the runtime makes before the
    abort lands.
    """

    __slots__ = ("_fast", "_loop", "_parked", "_wake_event", "count", "on_limit", "queue", "stop_after", "tensor")

    def __init__(self, tensor: int = 0, stop_after: int = 0, on_limit: Callable[[], object] | None = None) -> None:
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.tensor = tensor
        self.stop_after = stop_after
        self.on_limit = on_limit
        self.count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_event: asyncio.Event | None = None
        self._parked = False
        self._fast = False

    def get(self) -> tuple[Any, ...]:
        """Return the next item, blocking (the GIL is released while waiting).

        When items arrive faster than one per millisecond, waking the consumer
        for each one costs more than the work itself (a futex wake and a GIL
        hand-over per token, and a consumer holding the GIL stalls the runtime
        thread's next callback). In that regime the consumer naps 5 ms so the
        runtime thread can queue a batch undisturbed; the batch then becomes
        one chunk. At board speeds (tens of ms per token) it blocks and wakes
        at once, adding no latency; the first slow token after a burst leaves
        fast mode.
        """
        q = self.queue
        try:
            return q.get_nowait()
        except queue.Empty:
            pass
        if self._fast:
            time.sleep(_COALESCE_S)
            try:
                return q.get_nowait()
            except queue.Empty:
                pass
        t0 = time.perf_counter()
        item = q.get()
        # A tensor run posts a handful of items, not a token stream: nothing to coalesce.
        self._fast = not self.tensor and time.perf_counter() - t0 < _FAST_GAP_S
        return item

    def counted(self) -> None:
        """A token was posted under ``stop_after``: at the limit, say so and stop the run."""
        self.count += 1
        if self.count == self.stop_after:
            self.queue.put((LIMIT,))
            if self.on_limit is not None:
                self.on_limit()

    def put(self, item: tuple[Any, ...]) -> None:
        """Post an item (any thread)."""
        self.queue.put(item)
        if self._parked:
            self.wake()

    def wake(self) -> None:
        """Wake a parked async consumer (any thread)."""
        self._parked = False
        loop = self._loop
        if loop is not None and self._wake_event is not None:
            try:
                loop.call_soon_threadsafe(self._wake_event.set)
            except RuntimeError:  # loop closed; nobody is listening any more
                pass

    def get_many(self) -> list[tuple[Any, ...]]:
        """Block for at least one item; return it with every item already queued."""
        items = [self.get()]
        self._drain(items)
        return items

    async def get_many_async(self) -> list[tuple[Any, ...]]:
        """Like :meth:`get_many` without blocking the event loop."""
        items = [await self.get_async()]
        self._drain(items)
        return items

    def _drain(self, items: list[tuple[Any, ...]]) -> None:
        get_nowait = self.queue.get_nowait
        try:
            while True:
                items.append(get_nowait())
        except queue.Empty:
            pass

    async def get_async(self) -> tuple[Any, ...]:
        """Return the next item without blocking the event loop."""
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            pass
        if self._wake_event is None:
            self._loop = asyncio.get_running_loop()
            self._wake_event = asyncio.Event()
        while True:
            self._wake_event.clear()
            self._parked = True
            try:  # re-check after parking: a put may have raced the flag
                item = self.queue.get_nowait()
            except queue.Empty:
                await self._wake_event.wait()
                continue
            self._parked = False
            return item


class BatchChannel:
    """Carries a batched run's events (``n_batch`` > 1: an array of results per callback) to per-slot channels.

    Each slot has a :class:`RunChannel` of its own (``slots[i]``) that receives what a single
    run's channel would: ``NORMAL``/``WAITING`` items, ``LIMIT``, ``ERROR`` and ``END``. A
    slot's stream ends at its own end: the first negative ``token_id`` the runtime reports
    for it posts ``(END, 0, None)`` to that slot at once (the binding's own limit,
    ``stop_after``, does the same after ``LIMIT``); a slot still going when the run ends gets
    the run's end marker. A slot whose consumer is gone is *detached*: its tokens are dropped.
    When no slot is wanted any more (every one finished or detached) while the runtime is still
    generating, ``on_unwanted`` is called once (it must not block: it schedules the abort).

    Reading only what the contract documents: step results are read as an array of ``n``
    (stride ``sizeof(RKLLMResult)``); ``text`` may be NULL (a slot holding back an incomplete
    UTF-8 character, or a finished one) and is never read for a negative ``token_id``; a
    FINISH callback's shape is undocumented, so only its first result is read (``perf``,
    the run's stats as reported). In a WAITING callback no slot's text is a delta.
    """

    __slots__ = ("_lock", "_unwanted_sent", "finished", "on_end", "on_unwanted", "perf", "slots", "wanted")

    def __init__(
        self,
        slots: list[RunChannel],
        on_unwanted: Callable[[], object] | None = None,
        on_end: Callable[[list[int]], object] | None = None,
    ) -> None:
        self.slots = slots
        self.wanted = [True] * len(slots)
        """Per slot: somebody still reads it and it has not ended."""
        self.finished = [False] * len(slots)
        """Per slot: its end marker was posted."""
        self.on_unwanted = on_unwanted
        self.on_end = on_end
        """Called with the slots the run's end marker is about to end (they did not end on their own)."""
        self.perf: RKLLMPerfStat | None = None
        self._lock = threading.Lock()
        self._unwanted_sent = False

    def detach(self, slot: int) -> None:
        """Slot ``slot``'s consumer is gone: drop its tokens from now on (any thread)."""
        with self._lock:
            self.wanted[slot] = False
            fire = self._take_unwanted()
        if fire and self.on_unwanted is not None:
            self.on_unwanted()

    def end_slot(self, slot: int) -> None:
        """Post ``slot``'s end marker now (its last token has been posted), once."""
        with self._lock:
            if self.finished[slot]:
                return
            self.finished[slot] = True
            self.wanted[slot] = False
            fire = self._take_unwanted()
        self.slots[slot].put((END, 0, None))
        if fire and self.on_unwanted is not None:
            self.on_unwanted()

    def _take_unwanted(self) -> bool:
        if self._unwanted_sent or any(self.wanted):
            return False
        self._unwanted_sent = True
        return True

    def put(self, item: tuple[Any, ...]) -> None:
        """Post a run-level item (``ERROR``, ``END``) to every slot that has not ended (any thread)."""
        with self._lock:
            if item[0] == END:
                targets = [i for i, done in enumerate(self.finished) if not done]
                for i in targets:
                    self.finished[i] = True
            else:
                targets = [i for i, done in enumerate(self.finished) if not done]
        if item[0] == END and self.on_end is not None:
            self.on_end(targets)
        for i in targets:
            self.slots[i].put(item)

    def step(self, result: int, waiting: bool) -> None:
        """One NORMAL or WAITING callback: deliver every slot's token (called by the result callback)."""
        for i, channel in enumerate(self.slots):
            head = _head_at(result + i * _RESULT_SIZE)
            token = head.token_id
            if token < 0:
                self.end_slot(i)
                continue
            if self.finished[i] or not self.wanted[i]:
                continue  # ended, past the binding's limit, or nobody reads it
            text = None if waiting else head.text
            channel.put((WAITING, token) if text is None else (NORMAL, text, token))
            if channel.stop_after:
                channel.count += 1
                if channel.count >= channel.stop_after:
                    channel.put((LIMIT,))
                    self.end_slot(i)


_channels: dict[int, RunChannel] = {}
_batches: dict[int, BatchChannel] = {}
_channels_lock = threading.Lock()
_ids = itertools.count(1)


def open_channel(
    tensor: int = 0, stop_after: int = 0, on_limit: Callable[[], object] | None = None
) -> tuple[int, RunChannel]:
    """Register a new channel; return its id (the run's ``userdata``) and the channel.

    Args:
        tensor: :data:`HIDDEN` or :data:`LOGITS` for a run in one of those modes, else 0.
        stop_after: the binding's own token limit (0: none; see :class:`RunChannel`).
        on_limit: what stops the run once the limit is reached (it must not block).
    """
    channel = RunChannel(tensor, stop_after, on_limit)
    with _channels_lock:
        run_id = next(_ids)
        _channels[run_id] = channel
    return run_id, channel


def open_batch_channel(
    n: int,
    stop_after: int = 0,
    on_unwanted: Callable[[], object] | None = None,
    on_end: Callable[[list[int]], object] | None = None,
) -> tuple[int, BatchChannel]:
    """Register a channel for a batched run of ``n`` slots; return its id (the run's ``userdata``) and the channel.

    Args:
        n: the number of slots (the handle's ``n_batch``).
        stop_after: the binding's own token limit per slot (0: none): a slot ends after that many.
        on_unwanted: what stops the run once no slot is wanted any more (it must not block).
        on_end: called with the slots the run's end ends (see :attr:`BatchChannel.on_end`).
    """
    channel = BatchChannel([RunChannel(0, stop_after) for _ in range(n)], on_unwanted, on_end)
    with _channels_lock:
        run_id = next(_ids)
        _batches[run_id] = channel
    return run_id, channel


def close_channel(run_id: int) -> None:
    """Unregister a channel (single or batched); later callbacks for this id are ignored."""
    with _channels_lock:
        _channels.pop(run_id, None)
        _batches.pop(run_id, None)


class _ResultHead(ctypes.Structure):
    """The first two fields of ``RKLLMResult``: read together, with one ctypes object per token."""

    _fields_ = [("text", ctypes.c_char_p), ("token_id", ctypes.c_int32)]


assert field_offset(_ResultHead, "token_id") == _TOKEN_OFFSET and _TEXT_OFFSET == 0
_head_at = _ResultHead.from_address


def _on_result(result: int | None, userdata: int | None, state: int) -> int:
    # Per-token hot path: a dict lookup, one ctypes read and a queue put.
    try:
        channel = _channels.get(userdata or 0)
        if channel is None or not result:
            batch = _batches.get(userdata or 0)
            if batch is not None and result:
                _on_batch_result(batch, result, state)
            return 0
        if state == NORMAL and channel.tensor:
            _copy_tensor(channel, result)
        elif state == NORMAL:
            limit = channel.stop_after
            if limit and channel.count >= limit:
                return 0  # past the binding's limit: the abort is on its way
            head = _head_at(result)
            channel.queue.put((NORMAL, head.text or b"", head.token_id))
            if limit:
                channel.counted()
            if channel._parked:
                channel.wake()
        elif state == WAITING:
            # The runtime holds an incomplete UTF-8 character back; whatever
            # text it attaches here is not a delta, so it is ignored.
            if channel.stop_after and channel.count >= channel.stop_after:
                return 0
            channel.put((WAITING, _head_at(result).token_id))
            if channel.stop_after:
                channel.counted()
        elif state == FINISH:
            perf = RKLLMPerfStat.from_buffer_copy(_string_at(result + _PERF_OFFSET, _PERF_SIZE))
            channel.put((FINISH, perf))
        elif state == ERROR:
            channel.put((ERROR,))
    except BaseException:  # never let an exception cross into native code
        _report_failure(userdata)
    return 0


def _on_batch_result(batch: BatchChannel, result: int, state: int) -> None:
    """A batched run's callback: ``result`` points to an array of results (see :class:`BatchChannel`)."""
    if state == NORMAL or state == WAITING:
        batch.step(result, state == WAITING)
    elif state == FINISH:
        batch.perf = RKLLMPerfStat.from_buffer_copy(_string_at(result + _PERF_OFFSET, _PERF_SIZE))
    elif state == ERROR:
        batch.put((ERROR,))


def _copy_tensor(channel: RunChannel, result: int) -> None:
    """Copy the hidden states (all rows) or logits (the last row) out of the runtime's buffer."""
    if channel.tensor == HIDDEN:
        hidden = RKLLMResultLastHiddenLayer.from_address(result + _HIDDEN_OFFSET)
        pointer, rows, cols = hidden.hidden_states, int(hidden.num_tokens), int(hidden.embd_size)
        first = 0
    else:
        logits = RKLLMResultLogits.from_address(result + _LOGITS_OFFSET)
        pointer, rows, cols = logits.logits, int(logits.num_tokens), int(logits.vocab_size)
        first = rows - 1
    if not pointer or rows <= 0 or cols <= 0:  # a NORMAL callback without a buffer (the demos skip these)
        return
    address = ctypes.cast(pointer, ctypes.c_void_p).value or 0
    data = _string_at(address + first * cols * 4, (rows - first) * cols * 4)
    channel.put((TENSOR, data, rows - first, cols))


_last_failure_log = 0.0


def _report_failure(userdata: int | None) -> None:
    """A bug in the callback: fail the run visibly (an ERROR marker) and log, at most every 10 s."""
    global _last_failure_log
    try:
        channel = _channels.get(userdata or 0) or _batches.get(userdata or 0)
        if channel is not None:
            channel.put((ERROR,))
        now = time.monotonic()
        if now - _last_failure_log > 10.0:
            _last_failure_log = now
            logger.exception("the result callback failed; the run is reported as failed")
    except BaseException:  # noqa: S110 - nothing may escape into native code
        pass


RESULT_CALLBACK = LLMResultCallback(_on_result)
"""The process-wide callback object; it is never freed."""
