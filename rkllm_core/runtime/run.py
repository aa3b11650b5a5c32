"""One run on a handle: the handle's run worker, a run's life and decoding state, and the streams that read it.

Each handle has one worker thread (:class:`RunWorker`, started at its first run)
that calls the blocking ``rkllm_run`` for one run after another; the runtime's
callback only copies bytes into the run's channel. The worker always posts an
end marker once ``rkllm_run`` has returned (the end of a run is the return, not
a FINISH callback, which may not follow an abort), so a consumer can never hang.
Consumers decode UTF-8 incrementally and, if they stop early, abort the run:
a sync stream waits (bounded) until the runtime has returned, an async stream
never waits — the handle is let go by the worker when the run ends.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import logging
import queue
import threading
from array import array
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from ..errors import HandleClosedError, RKLLMError, RunError
from ..native.backend import Backend
from ..native.callback import (
    END,
    ERROR,
    FINISH,
    LIMIT,
    NORMAL,
    TENSOR,
    WAITING,
    BatchChannel,
    RunChannel,
    close_channel,
    open_channel,
)
from ..params import FinishReason, PerfStats, StreamChunk, Tensor

logger = logging.getLogger(__name__)

__all__ = ["ABORT_WAIT_S", "Run", "RunState", "RunStream", "RunWorker", "StreamState", "astream_run"]

ABORT_WAIT_S = 60.0
"""How long a sync consumer waits for an aborted run to return before giving up (and logging)."""


class RunState(enum.Enum):
    """Where a run is in its life; a run only ever moves forward through these."""

    QUEUED = 1
    """Handed to the handle's worker; ``rkllm_run`` has not been called yet."""
    RUNNING = 2
    """In ``rkllm_run``."""
    RETURNED = 3
    """``rkllm_run`` has returned (or was never called); the worker posts the end marker next."""
    ENDED = 4
    """The consumer has taken the end marker: nothing of the run is left anywhere."""


class Run:
    """One started run: the ctypes inputs (kept alive until it ends), its life cycle and decoding state."""

    def __init__(self, max_new_tokens: int, keepalive: tuple[Any, ...]) -> None:
        self.max_new_tokens = max_new_tokens
        self.keepalive = keepalive
        self.state = RunState.QUEUED
        self._returned = threading.Event()  # set with RETURNED, for waiting on it
        self.aborted = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stats: PerfStats | None = None
        self.error = False
        self.tokens = 0
        self.deferred: RKLLMError | None = None  # a failure to raise once the chunks before it are out
        self.finish_reason: FinishReason | None = None
        self.channel: RunChannel | None = None
        self.tensor: Tensor | None = None  # what a hidden-state or logits run returned
        self.limit_reached = False  # the binding ended the run at its own token limit (stop_after)
        self.batched = False  # a batched run (n_batch > 1): the KV cache holds nothing reusable afterwards

    @property
    def returned(self) -> bool:
        """True once ``rkllm_run`` has returned (or will never be called)."""
        return self.state is RunState.RETURNED or self.state is RunState.ENDED

    @property
    def ended(self) -> bool:
        """True once the consumer has taken the end marker."""
        return self.state is RunState.ENDED

    @property
    def cut(self) -> bool:
        """True if the binding's own token limit ended the run (the runtime may have gone a token or two further)."""
        channel = self.channel
        return channel is not None and 0 < channel.stop_after <= channel.count

    def mark_returned(self) -> None:
        """The worker's word that ``rkllm_run`` has returned."""
        self.state = RunState.RETURNED
        self._returned.set()

    def wait_returned(self, timeout: float | None) -> bool:
        """Wait until ``rkllm_run`` has returned; False if ``timeout`` seconds passed first."""
        return self._returned.wait(timeout)

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
            if kind == LIMIT:
                self.limit_reached = True
                continue
            if kind == TENSOR:
                values = array("f")
                values.frombytes(item[1])
                self.tensor = Tensor(values, item[2], item[3])
                continue
            if pending or n:
                self._emit(out, pending, n, last_token)
                pending, n = [], 0
            if kind == FINISH:
                p = item[1]
                if p is not None:
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
        self.state = RunState.ENDED
        tail = self.decoder.decode(b"", final=True)
        if exc is not None:
            raise RunError(f"rkllm_run raised {exc!r}", function="rkllm_run") from exc
        if self.limit_reached and (self.aborted or not (self.error or rc != 0)):
            # The binding's own limit ended the run: whatever the runtime made after the cut was
            # never delivered, so it is not counted either.
            reason: FinishReason = "length"
            if self.stats is not None and self.stats.generate_tokens > self.tokens:
                self.stats = dataclasses.replace(self.stats, generate_tokens=self.tokens)
        elif self.aborted:
            reason = "abort"
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


class RunHost(Protocol):
    """What a run's worker needs from the handle it runs on."""

    backend: Backend
    handle: int
    destroyed: bool

    def run_ended(self, run: Run) -> None:
        """Called by the worker once ``rkllm_run`` has returned."""

    def abort_soon(self, run: Run) -> None:
        """Abort ``run`` without blocking the caller (from the core's executor)."""


_Job = tuple[RunHost, Run, int, RunChannel | BatchChannel, Any, Any]


class RunWorker:
    """The thread that calls one handle's blocking ``rkllm_run``, one run after another.

    The handle's lock already serialises its runs, so one thread per handle is
    enough: it is started at the first run, waits for the next one in between
    (occupying no CPU), and ends after :meth:`stop` — when the handle is
    destroyed, or at interpreter exit. It is a daemon thread, so it never keeps
    the process alive, and it never calls ``rkllm_run`` once stopped or on a
    destroyed handle. Whatever happens, it posts every run's end marker.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def submit(self, host: RunHost, run: Run, inp: Any, infer: Any, tensor: int = 0, stop_after: int = 0) -> None:
        """Register the run's channel and hand the run to the worker thread.

        ``tensor`` (see :func:`~rkllm_core.native.callback.open_channel`) makes the
        callback copy hidden states or logits instead of text; ``stop_after`` makes it
        count tokens and abort the run after that many (the binding's own limit).

        Raises:
            HandleClosedError: the worker was stopped (the handle is closing).
        """
        on_limit = (lambda: host.abort_soon(run)) if stop_after else None
        run_id, channel = open_channel(tensor, stop_after, on_limit)
        run.channel = channel
        self.enqueue(host, run, run_id, channel, inp, infer)

    def enqueue(
        self, host: RunHost, run: Run, run_id: int, channel: RunChannel | BatchChannel, inp: Any, infer: Any
    ) -> None:
        """Hand a run whose channel is registered as ``run_id`` to the worker thread (the channel is closed on failure).

        Raises:
            HandleClosedError: the worker was stopped (the handle is closing).
        """
        with self._mutex:
            if self._stopped:
                close_channel(run_id)
                raise HandleClosedError(f"the runtime handle for {self._name} is closed")
            if self._thread is None:
                thread = threading.Thread(target=self._serve, name=f"rkllm-run {self._name}", daemon=True)
                try:
                    thread.start()
                except BaseException:  # e.g. no thread can start at interpreter shutdown: try again next run
                    close_channel(run_id)
                    raise
                self._thread = thread
            self._jobs.put((host, run, run_id, channel, inp, infer))

    def stop(self, timeout: float | None = None) -> bool:
        """Take no more runs; the thread ends once the run it has (if any) has returned.

        Args:
            timeout: seconds to wait for the thread to end; ``None`` does not wait
                (nor does a call from the worker thread itself).

        Returns:
            True unless the thread was waited for and is still running.
        """
        with self._mutex:
            if not self._stopped:
                self._stopped = True
                self._jobs.put(None)
            thread = self._thread
        if thread is None or timeout is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _serve(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            try:
                _execute(*job)
            except BaseException:  # pragma: no cover - _execute posts END whatever happens; keep serving
                logger.exception("the run worker of %s failed", self._name)
            del job  # let the run, its inputs and its handle go while waiting for the next one


def _execute(host: RunHost, run: Run, run_id: int, channel: RunChannel | BatchChannel, inp: Any, infer: Any) -> None:
    """Make one run's ``rkllm_run`` call; then hand the handle on and post the end marker, always."""
    rc = -1
    exc: BaseException | None = None
    try:
        if host.destroyed:  # pragma: no cover - the handle's lock never lets a destroy overtake a run
            exc = HandleClosedError("the runtime handle was destroyed before its run started")
        elif run.aborted:  # aborted while queued: there is nothing to start and stop
            rc = 0
        else:
            run.state = RunState.RUNNING
            rc = host.backend.run(host.handle, inp, infer, run_id)
    except BaseException as e:  # surfaced to the consumer through the end marker
        exc = e
    finally:
        close_channel(run_id)
        run.mark_returned()
        try:
            host.run_ended(run)  # may hand the handle to the next caller (or destroy a closed one)
        finally:
            channel.put((END, rc, exc))


class StreamState(enum.Enum):
    """Where a :class:`RunStream` is in its life."""

    NEW = 1
    """The run starts at the first ``next()``."""
    STREAMING = 2
    """The run started; chunks are being read."""
    DONE = 3
    """No more chunks: the last one was read, the start or the run failed, or the stream was closed."""


class RunStream(Iterator[StreamChunk]):
    """A synchronous stream of :class:`~rkllm_core.params.StreamChunk` for one run.

    The run starts (waiting its turn on the handle when needed) at the first
    ``next()``. Stopping early — ``break``, ``close()``, garbage collection or
    leaving a ``with`` block — aborts the run and waits until the runtime has
    returned. The final chunk has ``finish_reason`` set and, when the runtime
    reported them, ``stats``.
    """

    def __init__(self, start: Callable[[], Run], abort: Callable[[Run], object]) -> None:
        self._start = start
        self._abort = abort
        self._run: Run | None = None
        self._life = StreamState.NEW
        self._pieces: list[str] = []
        self._ready: deque[StreamChunk] = deque()

    @property
    def state(self) -> StreamState:
        """Where the stream is in its life."""
        return self._life

    @property
    def run(self) -> Run | None:
        """The run, once started."""
        return self._run

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

    @property
    def tokens(self) -> int:
        """Generated tokens seen so far."""
        return self._run.tokens if self._run else 0

    def __iter__(self) -> RunStream:
        return self

    def __enter__(self) -> RunStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> StreamChunk:
        if self._ready:
            return self._ready.popleft()
        if self._life is StreamState.DONE:
            raise StopIteration
        run = self._run
        if run is None:
            try:
                run = self._run = self._start()
            except BaseException:
                self._life = StreamState.DONE
                raise
            self._life = StreamState.STREAMING
        elif run.deferred is not None:
            self._life = StreamState.DONE
            raise run.deferred
        channel = run.channel
        assert channel is not None
        try:
            while True:
                chunks = run.feed_many(channel.get_many())
                if chunks:
                    self._pieces.extend(c.text for c in chunks)
                    if chunks[-1].finish_reason is not None:
                        self._life = StreamState.DONE
                    self._ready.extend(chunks[1:])
                    return chunks[0]
        except BaseException:
            if run.ended:  # the run failed and is over: nothing to stop or wait for
                self._life = StreamState.DONE
            elif self._life is not StreamState.DONE:  # KeyboardInterrupt and the like: stop the NPU too
                self.close()
            raise

    def abort(self) -> None:
        """Ask the runtime to stop; the stream then ends with ``finish_reason='abort'``."""
        if self._run is not None and self._life is StreamState.STREAMING:
            self._abort(self._run)

    def close(self) -> None:
        """Abort if still running and wait (bounded) until the runtime has returned."""
        if self._life is StreamState.DONE:
            return
        self._life = StreamState.DONE
        run = self._run
        if run is None or run.ended:
            return
        self._abort(run)
        if not run.wait_returned(ABORT_WAIT_S):
            logger.error("a run did not return %.0f s after rkllm_abort", ABORT_WAIT_S)
            return
        channel = run.channel
        assert channel is not None
        try:  # the end marker follows the return at once; consume it so the run is complete
            while channel.queue.get(timeout=ABORT_WAIT_S)[0] != END:
                pass
        except queue.Empty:  # pragma: no cover - the worker always posts END
            logger.error("a run returned without posting its end marker")
        run.state = RunState.ENDED
        run.finish_reason = run.finish_reason or "abort"

    def __del__(self) -> None:
        # A stream dropped mid-run must not leave the NPU generating for nobody (never blocks).
        if self._life is StreamState.STREAMING and self._run is not None and not self._run.ended:
            try:
                self._abort(self._run)
            except Exception:  # pragma: no cover - interpreter teardown
                logger.debug("abort of a dropped stream failed", exc_info=True)


async def astream_run(run: Run, abort_soon: Callable[[Run], object]) -> AsyncIterator[StreamChunk]:
    """The chunks of a started run, without blocking the event loop.

    Closing the generator early or cancelling its task aborts the run (the
    abort is sent from the core's executor; nothing here waits for the run).
    """
    channel = run.channel
    assert channel is not None
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
        if not finished and not run.ended:
            abort_soon(run)
