"""A first-come-first-served lock usable from threads and from asyncio.

Ownership is handed directly to the next waiter on release, so callers are
served in arrival order. The lock is not tied to a thread: a run started on
one thread is released by the worker thread that ends it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class _Waiter:
    __slots__ = ("granted",)

    def __init__(self) -> None:
        self.granted = False

    def wake(self) -> bool:  # pragma: no cover - overridden
        """Signal ownership; return False if the waiter can no longer take it."""
        raise NotImplementedError


class _ThreadWaiter(_Waiter):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def wake(self) -> bool:
        self.event.set()
        return True


class _AsyncWaiter(_Waiter):
    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop is closed: nobody will take the lock
            return False
        return True

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class FifoLock:
    """A non-reentrant FIFO lock with sync and async acquisition and timeouts."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locked = False
        self._waiters: deque[_Waiter] = deque()

    def locked(self) -> bool:
        """Return True while some caller owns the lock."""
        return self._locked

    def waiting(self) -> int:
        """Return how many callers are queued."""
        return len(self._waiters)

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait in line for the lock. Return False if ``timeout`` seconds passed first."""
        with self._mutex:
            if not self._locked and not self._waiters:
                self._locked = True
                return True
            waiter = _ThreadWaiter()
            self._waiters.append(waiter)
        if waiter.event.wait(timeout):
            return True
        with self._mutex:
            if waiter.granted:  # granted between the timeout and the mutex
                return True
            self._waiters.remove(waiter)
            return False

    async def acquire_async(self, timeout: float | None = None) -> bool:
        """Like :meth:`acquire` without blocking the event loop; cancellation leaves the line."""
        loop = asyncio.get_running_loop()
        with self._mutex:
            if not self._locked and not self._waiters:
                self._locked = True
                return True
            waiter = _AsyncWaiter(loop)
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
            return True
        except BaseException as exc:
            with self._mutex:
                if waiter.granted:
                    owned = True
                else:
                    owned = False
                    self._waiters.remove(waiter)
            if owned:
                if isinstance(exc, TimeoutError):
                    return True  # it arrived just in time
                self.release()  # cancelled after being handed the lock: pass it on
            if isinstance(exc, TimeoutError):
                return False
            raise

    def release(self) -> None:
        """Hand the lock to the next waiter, or unlock. Any thread may call this."""
        with self._mutex:
            if not self._locked:
                raise RuntimeError("release of an unlocked FifoLock")
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
                if waiter.wake():
                    return
            self._locked = False
