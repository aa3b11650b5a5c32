"""One run on a handle: its worker thread, its decoding state, and the streams that read it.

Per run, a worker thread calls the blocking ``rkllm_run``; the runtime's
callback only copies bytes into the run's channel. The worker always posts an
end marker once ``rkllm_run`` has returned (the end of a run is the return, not a
FINISH callback, which may not follow an abort), so a consumer can never hang.
Consumers decode UTF-8 incrementally and, if they stop early, abort the run:
a sync stream waits (bounded) until the runtime has returned, an async stream
never waits — the handle is let go by the worker when the run ends.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
from array import array
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from ..errors import RKLLMError, RunError
from ..native.backend import Backend
from ..native.callback import (
    END,
    ERROR,
    FINISH,
    NORMAL,
    TENSOR,
    WAITING,
    RunChannel,
    close_channel,
    open_channel,
)
from ..params import FinishReason, PerfStats, StreamChunk, Tensor

logger = logging.getLogger(__name__)

__all__ = ["ABORT_WAIT_S", "RunStream", "astream_run"]

ABORT_WAIT_S = 60.0
"""How long a sync consumer waits for an aborted run to return before giving up (and logging)."""


class Run:
    """One started run: the ctypes inputs (kept alive until it ends) and its decoding state."""

    def __init__(self, max_new_tokens: int, keepalive: tuple[Any, ...]) -> None:
        self.max_new_tokens = max_new_tokens
        self.keepalive = keepalive
        self.aborted = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stats: PerfStats | None = None
        self.error = False
        self.tokens = 0
        self.ended = False  # the worker's end marker was consumed: rkllm_run has returned
        self.returned = threading.Event()  # set by the worker when rkllm_run has returned
        self.deferred: RKLLMError | None = None  # a failure to raise once the chunks before it are out
        self.finish_reason: FinishReason | None = None
        self.channel: RunChannel | None = None
        self.tensor: Tensor | None = None  # what a hidden-state or logits run returned

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


class RunHost(Protocol):
    """What a run's worker needs from the handle it runs on."""

    backend: Backend
    handle: int

    def run_ended(self, run: Run) -> None:
        """Called by the worker once ``rkllm_run`` has returned."""


def start_worker(state: RunHost, run: Run, inp: Any, infer: Any, tensor: int = 0) -> None:
    """Register the run's channel and start the thread that calls ``rkllm_run``.

    ``tensor`` (see :func:`~rkllm_core.native.callback.open_channel`) makes the
    callback copy hidden states or logits instead of text.
    """
    run_id, channel = open_channel(tensor)
    run.channel = channel
    worker = threading.Thread(
        target=_run_worker, args=(state, run, run_id, channel, inp, infer), name=f"rkllm-run-{run_id}", daemon=True
    )
    worker.start()


def _run_worker(state: RunHost, run: Run, run_id: int, channel: RunChannel, inp: Any, infer: Any) -> None:
    rc, exc = -1, None
    try:
        rc = state.backend.run(state.handle, inp, infer, run_id)
    except BaseException as e:  # surfaced to the consumer through the end marker
        exc = e
    finally:
        close_channel(run_id)
        run.returned.set()
        state.run_ended(run)  # may hand the handle to the next caller (or destroy a closed one)
        channel.put((END, rc, exc))


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
        if self._run is not None and self._run.deferred is not None and not self._done:
            self._done = True
            raise self._run.deferred
        if self._done:
            raise StopIteration
        if self._run is None:
            try:
                self._run = self._start()
            except BaseException:
                self._done = True
                raise
        run = self._run
        channel = run.channel
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
            self._abort(self._run)

    def close(self) -> None:
        """Abort if still running and wait (bounded) until the runtime has returned."""
        if self._done:
            return
        self._done = True
        run = self._run
        if run is None or run.ended:
            return
        self._abort(run)
        if not run.returned.wait(ABORT_WAIT_S):
            logger.error("a run did not return %.0f s after rkllm_abort", ABORT_WAIT_S)
            return
        channel = run.channel
        assert channel is not None
        try:  # the end marker follows `returned` at once; consume it so the run is complete
            while channel.queue.get(timeout=ABORT_WAIT_S)[0] != END:
                pass
        except queue.Empty:  # pragma: no cover - the worker always posts END
            logger.error("a run returned without posting its end marker")
        run.ended = True
        run.finish_reason = run.finish_reason or "abort"

    def __del__(self) -> None:
        # A stream dropped mid-run must not leave the NPU generating for nobody (never blocks).
        if not self._done and self._run is not None and not self._run.ended:
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
