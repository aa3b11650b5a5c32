"""Waiting that works the same for threads and for asyncio tasks.

The core is used from plain threads (``invoke``, ``batch``, a sync FastAPI
handler) and from asyncio tasks (``ainvoke``, ``abatch``, workflows) at the same
time, on the same models. The rules this module implements:

* **Owners are threads or tasks.** :func:`current_owner` is the running asyncio
  task, else the current thread. Work of one task may hop between pool threads;
  bookkeeping keyed by thread ids would mistake one task for another.
* **What a call chain holds travels with it.** Handles and leases a caller holds
  are recorded in a context variable (:func:`hold`), which tasks created from
  there (``asyncio.gather`` inside LangChain's ``ainvoke``, ``asyncio.wait_for``,
  ``asyncio.to_thread``) inherit. A request that would wait for something its own
  chain holds is a deadlock and is refused at once (:func:`held_items`).
* **Waiting never borrows a thread.** A :class:`Waiter` is an event for a
  thread and a future on its loop for a task, so an awaiting task occupies no
  thread at all. Cancelling the task leaves the line at once.
* **Lines are first come, first served.** :class:`FifoLock` hands ownership to
  the next waiter on release, so callers are served in arrival order whatever
  mix of threads and tasks they are.
* **Short native calls run on threads the core owns** (:func:`offload`), never
  on the event loop's default executor, which user code can fill up.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Literal, Protocol, TypeVar

__all__ = [
    "Deadline",
    "FifoLock",
    "Reservation",
    "Waiter",
    "current_owner",
    "hold",
    "held_items",
    "native_executor",
    "offload",
    "unhold",
]

_T = TypeVar("_T")

NATIVE_WORKERS = 4
"""Threads of the core's executor for short native calls (init, destroy, set-up calls)."""


def current_owner() -> Hashable:
    """Who is asking: the running asyncio task, else the current thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return threading.current_thread()
    task = asyncio.current_task()
    return task if task is not None else threading.current_thread()


class Holding(Protocol):
    """Something a call chain holds (a session on a handle, a lease on a model)."""

    @property
    def holding(self) -> bool:
        """True until it is let go (from wherever that happens)."""


_HELD: ContextVar[tuple[Holding, ...]] = ContextVar("rkllm_core_held", default=())

NESTED_GRACE_TURNS = 10
"""Event-loop turns an async request waits before calling a nested request a deadlock.

An async generator dropped without ``aclose()`` (``break`` out of ``async for``) is
closed by a task the loop schedules at once; until it has run, its caller still
looks like it holds the generator's model. A few turns let that close happen.
"""


def hold(item: Holding) -> None:
    """Record that the current call chain holds ``item`` (forgetting what it let go of)."""
    _HELD.set((*(x for x in _HELD.get() if x.holding and x is not item), item))


def unhold(item: Holding) -> None:
    """Forget ``item`` in the current context (a no-op where it was never recorded)."""
    items = _HELD.get()
    if item in items:
        _HELD.set(tuple(x for x in items if x is not item and x.holding))


def held_items() -> list[Holding]:
    """What the current call chain holds and has not let go of."""
    return [x for x in _HELD.get() if x.holding]


def on_event_loop() -> bool:
    """True when called from a thread that is running an asyncio event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def describe_owner(owner: Hashable) -> str:
    """A short human name for an owner, for error messages."""
    if isinstance(owner, asyncio.Task):
        return f"task {owner.get_name()!r}"
    if isinstance(owner, threading.Thread):
        return f"thread {owner.name!r}"
    return repr(owner)


class Deadline:
    """A point in time derived from a ``timeout`` in seconds (``None``: no limit)."""

    __slots__ = ("_end", "timeout")

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
            raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
        if timeout is not None and math.isnan(timeout):
            raise ValueError("timeout must not be NaN")
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + max(0.0, float(timeout))

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` without a limit."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        """True once the time is up."""
        return self._end is not None and time.monotonic() >= self._end


class Waiter:
    """One party waiting for something: a thread (an event) or a task (a future on its loop).

    :meth:`wake` may be called from any thread, any number of times; a woken
    waiter returns from :meth:`wait` / :meth:`wait_async` and re-examines the
    state it waits for. Callers re-arm it with :meth:`reset` under the same
    lock that guards that state and wakers hold, so no wake-up is lost.

    Args:
        owner: who waits (default: :func:`current_owner`).
        loop: the event loop of an async waiter; ``None`` for a thread that
            blocks (even one that runs a loop: a sync call from async code
            blocks that loop, which is its caller's choice).
    """

    __slots__ = ("_event", "_future", "_loop", "owner")

    def __init__(self, owner: Hashable | None = None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.owner = owner if owner is not None else current_owner()
        self._loop = loop
        self._event: threading.Event | None = threading.Event() if self._loop is None else None
        self._future: asyncio.Future[None] | None = None
        self.reset()

    @property
    def is_async(self) -> bool:
        """True for a waiter on an event loop."""
        return self._loop is not None

    def reset(self) -> None:
        """Re-arm: the next wait blocks until the next :meth:`wake`."""
        if self._loop is None:
            assert self._event is not None
            self._event.clear()
        else:
            self._future = self._loop.create_future()

    def wake(self) -> bool:
        """Wake the waiter (any thread). Returns False if it can never wake (its loop is closed)."""
        if self._loop is None:
            assert self._event is not None
            self._event.set()
            return True
        future = self._future
        if future is None:  # pragma: no cover - always armed
            return True
        try:
            self._loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:  # the loop is closed: nobody will ever look
            return False
        return True

    def wait(self, timeout: float | None) -> bool:
        """Block the calling thread until woken; False if ``timeout`` passed first."""
        assert self._event is not None, "an async waiter was waited on from a thread"
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float | None) -> bool:
        """Await until woken (occupies no thread); False on timeout. Cancellation propagates."""
        future = self._future
        assert future is not None, "a thread waiter was awaited"
        if future.done():
            return True
        if timeout is None:
            await asyncio.shield(future)  # shield: cancelling us must not look like a wake-up
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(future)
        except TimeoutError:
            return future.done()
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FifoLock:
    """A non-reentrant first-come-first-served lock for threads and tasks, with timeouts.

    Ownership is handed directly to the next waiter on release, so callers are
    served in arrival order. The lock records its logical :attr:`owner` (the
    thread or task that acquired it) for deadlock checks, but any thread may
    release it: a run started by one caller is released by the worker thread
    that ends it.

    A place in line can be booked before its owner asks (:meth:`reserve`): the
    model manager books the handle's turn when it grants a lease, so requests
    use a model in the order the manager served them, whichever thread wakes
    first. The booking is claimed by the next :meth:`acquire` of the call chain
    that holds it (see :func:`hold`).
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locked = False
        self._owner: Hashable | None = None
        self._waiters: deque[_LockWaiter] = deque()

    def locked(self) -> bool:
        """True while some caller owns the lock."""
        return self._locked

    @property
    def owner(self) -> Hashable | None:
        """The thread or task that holds the lock, if any."""
        return self._owner

    def waiting(self) -> int:
        """How many callers (and bookings) are in line."""
        return len(self._waiters)

    def try_acquire(self, owner: Hashable | None = None) -> bool:
        """Take the lock only if it is free and nobody is in line."""
        with self._mutex:
            if self._locked or self._waiters:
                return False
            self._locked, self._owner = True, owner if owner is not None else current_owner()
            return True

    def reserve(self, owner: Hashable, release: Callable[[], None] | None = None) -> Reservation:
        """Book the next place in line for ``owner`` (granted at once when the lock is free).

        Args:
            owner: who the place is for.
            release: what lets go of the lock if the booking is cancelled after it
                was granted (default :meth:`release`).
        """
        entry = _LockWaiter(owner, None)
        with self._mutex:
            if not self._locked and not self._waiters:
                self._locked, self._owner, entry.granted = True, owner, True
            else:
                self._waiters.append(entry)
        return Reservation(self, entry, release or self.release)

    def acquire(self, timeout: float | None = None, owner: Hashable | None = None) -> bool:
        """Wait in line for the lock; False if ``timeout`` seconds passed first."""
        entry = self._enqueue(owner, None)
        if entry is None:
            return True
        assert entry.waiter is not None
        if entry.waiter.wait(timeout):
            return True
        return self._leave(entry)

    async def acquire_async(self, timeout: float | None = None, owner: Hashable | None = None) -> bool:
        """Like :meth:`acquire`, awaiting without occupying a thread; cancellation leaves the line at once."""
        entry = self._enqueue(owner, asyncio.get_running_loop())
        if entry is None:
            return True
        assert entry.waiter is not None
        try:
            if await entry.waiter.wait_async(timeout):
                return True
        except BaseException:
            if self._leave(entry):  # handed the lock just as we were cancelled: pass it on
                self.release()
            raise
        return self._leave(entry)

    def _enqueue(self, owner: Hashable | None, loop: asyncio.AbstractEventLoop | None) -> _LockWaiter | None:
        """Join the line (or take a booking the caller's chain holds); None if the lock is ours now."""
        me = owner if owner is not None else current_owner()
        booking = next((x for x in held_items() if isinstance(x, Reservation) and x.lock is self), None)
        with self._mutex:
            if booking is not None and booking.claim():
                entry = booking.entry
                entry.owner = me
                if entry.granted:
                    self._owner = me
                    return None
                entry.waiter = Waiter(me, loop)
                return entry
            if not self._locked and not self._waiters:
                self._locked, self._owner = True, me
                return None
            entry = _LockWaiter(me, Waiter(me, loop))
            self._waiters.append(entry)
            return entry

    def _leave(self, entry: _LockWaiter) -> bool:
        """Leave the line (a timeout, a cancel, a booking given up); True if the lock was granted meanwhile."""
        with self._mutex:
            if entry.granted:
                return True
            self._waiters.remove(entry)
            return False

    def release(self) -> None:
        """Hand the lock to the next waiter, or unlock. Any thread may call this."""
        with self._mutex:
            if not self._locked:
                raise RuntimeError("release of an unlocked FifoLock")
            while self._waiters:
                entry = self._waiters.popleft()
                entry.granted = True
                self._owner = entry.owner
                if entry.waiter is None or entry.waiter.wake():  # a booking holds the lock until claimed
                    return
            self._locked, self._owner = False, None


class _LockWaiter:
    __slots__ = ("granted", "owner", "waiter")

    def __init__(self, owner: Hashable, waiter: Waiter | None) -> None:
        self.owner = owner
        self.waiter = waiter  # None while a booking is not claimed
        self.granted = False


class Reservation:
    """A place in a :class:`FifoLock`'s line booked for an owner (see :meth:`FifoLock.reserve`).

    Record it with :func:`hold` in the call chain that will use the lock: that
    chain's next acquire takes the booked place. :meth:`cancel` gives the place up
    (idempotent); a claimed booking is an ordinary acquisition from then on.
    """

    __slots__ = ("_release", "_state", "entry", "lock")

    def __init__(self, lock: FifoLock, entry: _LockWaiter, release: Callable[[], None]) -> None:
        self.lock = lock
        self.entry = entry
        self._release = release
        self._state: Literal["booked", "claimed", "cancelled"] = "booked"

    @property
    def holding(self) -> bool:
        """True while the booking waits to be claimed."""
        return self._state == "booked"

    def claim(self) -> bool:
        """Take the booking (called by the lock, under its mutex); False if it is no longer booked."""
        if self._state != "booked":
            return False
        self._state = "claimed"
        return True

    def cancel(self) -> None:
        """Give the place up; if it had been granted, let go of the lock."""
        with self.lock._mutex:
            if self._state != "booked":
                return
            self._state = "cancelled"
        if self.lock._leave(self.entry):  # it held the lock: let go of it
            self._release()


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def native_executor() -> ThreadPoolExecutor:
    """The core's own small thread pool for short native calls (created on first use).

    Async code runs ``rkllm_init``, ``rkllm_destroy`` and the set-up calls of a
    request here instead of on the event loop, and never on the loop's default
    executor: user code cannot starve these threads, and they never wait for a
    lock (callers hold what the call needs before submitting it).
    """
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=NATIVE_WORKERS, thread_name_prefix="rkllm-native")
        return _executor


def submit(fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """Run ``fn(*args)`` on the core's executor."""
    return native_executor().submit(fn, *args)


async def offload(fn: Callable[..., _T], *args: Any) -> _T:
    """Await ``fn(*args)`` run on the core's executor.

    Cancelling the caller does not wait for the call, nor cancel it (not even
    before it starts): it runs to the end on its own thread, and its result is
    dropped. Callers that must not let go of a
    resource while the call runs arrange for the call to release it (see
    :meth:`rkllm_core.runtime.Session.call`).
    """
    return await asyncio.shield(asyncio.wrap_future(submit(fn, *args)))
