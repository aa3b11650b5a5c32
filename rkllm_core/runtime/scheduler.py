"""The scheduler between requests and batched runs: gather compatible requests into one run of N slots.

Design
------
A handle made with ``InitParams(n_batch=N)`` runs only batched runs (see :mod:`.batch`).
Its :class:`BatchScheduler` (one per handle, :func:`scheduler_for`; the state about
native work lives with the handle) turns single requests into those runs:

* **A request is a ticket.** :meth:`BatchScheduler.submit` queues one prompt with its
  *group* — what must be equal for requests to share a run: the chat setup installed
  on the handle (template or function tools, system prompt), the shared sampling and
  ``max_new_tokens`` (one ``RKLLMInferParam`` per run) — and returns a :class:`Ticket`.
  The ticket's :meth:`~Ticket.slot` / :meth:`~Ticket.aslot` wait for the request's own
  :class:`~rkllm_core.runtime.batch.BatchSlot`: one request, one stream, with its own
  finish reason and token count.
* **One dispatcher thread per scheduler** (the core's own, started on demand, gone
  when the queue is empty) does the native side: it waits for the gather window,
  takes the handle's turn (so a run in progress finishes first), takes the head
  ticket and up to N - 1 later tickets of the head's group in arrival order, installs
  the group's setup, starts one batched run and hands each ticket its slot. Free
  slots get the filler prompt (layer 1's rule: the runtime reads N inputs).
* **When a run starts** (the policy, :class:`BatchPolicy`): as soon as N requests of
  one group wait, or ``gather_s`` (20 ms by default) after the oldest waiting request
  arrived. A request that arrives while a run is going waits for the next run.
* **Fairness.** Runs always serve the oldest waiting request first; later requests of
  another group wait behind it. So a request waits at most for the runs serving the
  requests queued before it, never for an unbounded number of later ones.
* **Every wait is bounded and cancellable.** A ticket carries its deadline: the
  dispatcher fails an expired ticket with :class:`~rkllm_core.errors.BusyError`, and
  waiting for the handle is bounded by the head ticket's deadline. A waiter that gives
  up (timeout, cancel, exception) leaves the queue at once; if its slot was already
  handed over, the slot is detached, so the other slots go on and the run is aborted
  only when no slot is wanted. Async waiters await a future: no thread is parked.
* **What a batched turn costs.** ``keep_history`` is 0 in a batched run, so every
  request prefills its whole conversation, with no KV reuse and no prompt cache; the
  chat engine reports that in its usage (prefilled tokens == input tokens).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._sync import Deadline
from ..errors import BusyError, HandleClosedError, InvalidParameterError
from .batch import FILLER_PROMPT, BatchInput, BatchOptions, BatchSlot

if TYPE_CHECKING:
    from .handle import RKLLMRuntime, Session

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_GATHER_S", "BatchPolicy", "BatchScheduler", "SchedulerStats", "Ticket", "scheduler_for"]

DEFAULT_GATHER_S = 0.02
"""How long the oldest waiting request waits for others before a run starts without them (seconds)."""


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When the scheduler starts a batched run.

    Attributes:
        gather_s: once a request waits, start a run at most this many seconds after it
            arrived (sooner when N requests of its group wait).
        filler: the prompt of the slots no request needs.
    """

    gather_s: float = DEFAULT_GATHER_S
    filler: str = FILLER_PROMPT

    def __post_init__(self) -> None:
        if not isinstance(self.gather_s, int | float) or not 0 <= self.gather_s <= 10:
            raise InvalidParameterError(f"gather_s must be between 0 and 10 seconds, got {self.gather_s!r}")


@dataclass(slots=True)
class SchedulerStats:
    """What a scheduler has done (counters only grow)."""

    runs: int = 0
    """Batched runs started."""
    slots_used: int = 0
    """Slots given to requests (the rest held fillers)."""
    expired: int = 0
    """Requests failed because their deadline passed while they waited."""
    cancelled: int = 0
    """Requests whose waiter gave up (before or after getting a slot)."""
    max_overtaken: int = 0
    """The most later requests one request saw served before it."""
    unfair: int = 0
    """Requests overtaken more than the fairness bound allows: (N - 1) later requests per request that
    was already waiting when it arrived (only a run headed by an older request takes later ones)."""


class Ticket:
    """One queued request: wait for its slot with :meth:`slot` (threads) or :meth:`aslot` (tasks)."""

    def __init__(
        self,
        seq: int,
        item: str | BatchInput,
        group: Hashable,
        prepare: Callable[[Session], None],
        options: BatchOptions,
        deadline: Deadline,
    ) -> None:
        self.seq = seq
        self.item = item
        self.group = group
        self.prepare = prepare
        self.options = options
        self.deadline = deadline
        self.arrived = time.monotonic()
        self.overtaken = 0
        self.ahead = 0
        """Requests already waiting when this one arrived."""
        self.future: Future[BatchSlot] = Future()
        self._lock = threading.Lock()
        self._abandoned = False

    def deliver(self, slot: BatchSlot) -> None:
        """Hand the ticket its slot (the dispatcher, once); a waiter that already left gets it detached."""
        with self._lock:
            if not self._abandoned:
                self.future.set_result(slot)
                return
        slot.detach()

    def cancel(self) -> bool:
        """Give up: leave the queue, or detach the slot if it was already handed over. True the first time."""
        with self._lock:
            if self._abandoned:
                return False
            self._abandoned = True
            if self.future.cancel():
                return True
        if self.future.done() and self.future.exception() is None:
            self.future.result().detach()
        return True

    @property
    def abandoned(self) -> bool:
        """True once the waiter gave up."""
        return self._abandoned

    def _timed_out(self) -> BusyError:
        return BusyError(
            f"no batched run had a free slot within {self.deadline.timeout} s; try again later",
            reason="timeout",
            waited=self.deadline.timeout,
        )

    def slot(self) -> BatchSlot:
        """Wait (bounded by the ticket's deadline) for the request's slot.

        Raises:
            BusyError: the deadline passed first.
            HandleClosedError, NativeError, RunError: the run could not start.
        """
        try:
            return self.future.result(self.deadline.remaining())
        except FutureTimeout:
            if self.cancel():
                raise self._timed_out() from None
            return self.future.result(0)
        except BaseException:  # KeyboardInterrupt and the like: this waiter is gone
            self.cancel()
            raise

    async def aslot(self) -> BatchSlot:
        """Async :meth:`slot`: awaits a future (no thread parked); cancelling leaves the queue at once."""
        waiting = asyncio.wrap_future(self.future)
        try:
            return await asyncio.wait_for(waiting, self.deadline.remaining())
        except TimeoutError:
            self.cancel()
            raise self._timed_out() from None
        except BaseException:
            self.cancel()
            raise


class BatchScheduler:
    """Gathers compatible requests for one ``n_batch`` handle into batched runs (see the module docs).

    Args:
        runtime: a handle made with ``InitParams(n_batch=N)``, N >= 1.
        policy: when runs start.
    """

    def __init__(self, runtime: RKLLMRuntime, policy: BatchPolicy | None = None) -> None:
        self._rt_ref = weakref.ref(runtime)  # the handle owns its scheduler, not the other way round
        self.name = runtime.model_path.name
        self.policy = policy or BatchPolicy()
        self.n_batch = runtime.params.n_batch or 1
        self.stats = SchedulerStats()
        self._queue: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        with self._cond:
            return len(self._queue)

    def submit(
        self,
        item: str | BatchInput,
        *,
        group: Hashable,
        prepare: Callable[[Session], None],
        options: BatchOptions | None = None,
        timeout: float | None = None,
    ) -> Ticket:
        """Queue one request; never waits.

        Args:
            item: the slot's input.
            group: requests with equal groups may share a run (equal setup, sampling and limit).
            prepare: brings the handle to the group's setup, called in the run's session before it starts.
            options: the run's shared options (``sampling``, ``max_new_tokens``), equal within a group.
            timeout: seconds the request may wait for a slot.
        """
        with self._cond:
            rt = self._rt_ref()
            if rt is None or rt.closed:
                raise HandleClosedError(f"the runtime handle for {self.name} is closed")
            self._seq += 1
            ticket = Ticket(self._seq, item, group, prepare, dict(options or {}), Deadline(timeout))  # type: ignore[arg-type]
            ticket.ahead = len(self._queue)
            self._queue.append(ticket)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="rkllm-batch", daemon=True)
                self._thread.start()
        return ticket

    # -- the dispatcher ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            head = self._gather()
            if head is None:
                return
            try:
                self._serve(head)
            except Exception:  # pragma: no cover - _serve fails tickets itself; never let the thread die silently
                logger.exception("the batch scheduler of %s failed", self.name)

    def _gather(self) -> Ticket | None:
        """Wait for the gather window of the oldest live ticket; None (and the thread ends) when none is left."""
        with self._cond:
            while True:
                self._drop_dead()
                if not self._queue:
                    self._thread = None
                    return None
                head = self._queue[0]
                mates = sum(1 for t in self._queue if t.group == head.group)
                left = head.arrived + self.policy.gather_s - time.monotonic()
                if mates >= self.n_batch or left <= 0:
                    return head
                self._cond.wait(left)

    def _drop_dead(self) -> None:
        """Forget abandoned tickets and fail expired ones (under the condition's lock)."""
        for ticket in list(self._queue):
            if ticket.abandoned or ticket.future.done():
                self._queue.remove(ticket)
                self.stats.cancelled += ticket.abandoned
            elif ticket.deadline.expired:
                self._queue.remove(ticket)
                self.stats.expired += 1
                if ticket.future.set_running_or_notify_cancel():
                    ticket.future.set_exception(ticket._timed_out())

    def _take(self, group: Hashable) -> list[Ticket]:
        """Up to N live tickets of ``group``, oldest first, marked running; counts who was overtaken."""
        with self._cond:
            self._drop_dead()
            chosen = [t for t in self._queue if t.group == group][: self.n_batch]
            taken = [t for t in chosen if t.future.set_running_or_notify_cancel()]
            for t in chosen:
                self._queue.remove(t)
            if taken:
                last = max(t.seq for t in taken)
                for t in self._queue:
                    if t.seq < last:
                        t.overtaken += sum(1 for x in taken if x.seq > t.seq)
                        self.stats.max_overtaken = max(self.stats.max_overtaken, t.overtaken)
                        self.stats.unfair += t.overtaken > (self.n_batch - 1) * t.ahead
            return taken

    def _serve(self, head: Ticket) -> None:
        """Take the handle's turn, then start one run for the head's group and hand out its slots."""
        from .handle import Session  # the handle module imports this one's siblings; no cycle at import

        rt = self._rt_ref()
        if rt is None:
            self._fail_all(HandleClosedError(f"the runtime handle for {self.name} is closed"))
            return
        try:
            session = Session(rt, head.deadline.remaining()).acquire(owner=self)
        except BusyError:
            return  # the head's deadline passed while a run went on: _gather fails it next
        except HandleClosedError as exc:
            self._fail_all(exc)
            return
        taken: list[Ticket] = []
        try:
            taken = self._take(head.group)
            if not taken:
                return
            taken[0].prepare(session)
            run = session.batch([t.item for t in taken], filler=self.policy.filler, **taken[0].options)
        except BaseException as exc:
            for t in taken:
                t.future.set_exception(exc)
            return
        finally:
            session.release()  # takes effect when the run has returned
        self.stats.runs += 1
        self.stats.slots_used += len(taken)
        for ticket, slot in zip(taken, run.slots, strict=True):
            ticket.deliver(slot)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            tickets, self._queue = list(self._queue), deque()
        for t in tickets:
            if t.future.set_running_or_notify_cancel():
                t.future.set_exception(exc)


_schedulers: weakref.WeakKeyDictionary[RKLLMRuntime, BatchScheduler] = weakref.WeakKeyDictionary()
_schedulers_lock = threading.Lock()


def scheduler_for(runtime: RKLLMRuntime, policy: BatchPolicy | None = None) -> BatchScheduler:
    """The scheduler of ``runtime`` (one per handle, made on first use; ``policy`` applies then, or replaces it).

    Raises:
        InvalidParameterError: the handle was not made with ``n_batch`` > 1.
    """
    if (runtime.params.n_batch or 1) < 2:
        raise InvalidParameterError(f"{runtime.model_path.name} has no n_batch > 1: nothing to schedule")
    with _schedulers_lock:
        sched = _schedulers.get(runtime)
        if sched is None:
            sched = _schedulers[runtime] = BatchScheduler(runtime, policy)
        elif policy is not None:
            sched.policy = policy
        return sched
