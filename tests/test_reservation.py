"""Booked places in a FifoLock's line: granted in order, claimed by the chain that holds them."""

from __future__ import annotations

import asyncio
import threading
import time

from rkllm_core._sync import FifoLock, hold, unhold


def test_a_booking_on_a_free_lock_is_granted_and_claimed_without_waiting() -> None:
    lock = FifoLock()
    booking = lock.reserve("me")
    assert lock.locked() and lock.owner == "me"
    assert not lock.try_acquire("other")
    hold(booking)
    try:
        assert lock.acquire(timeout=0)  # the chain's first acquire takes the booked turn
        assert not booking.holding
    finally:
        unhold(booking)
    lock.release()
    assert not lock.locked()


def test_bookings_are_served_before_later_callers_in_booking_order() -> None:
    lock = FifoLock()
    assert lock.acquire()
    first, second = lock.reserve("first"), lock.reserve("second")
    order: list[str] = []
    late_started = threading.Event()

    def late() -> None:
        late_started.set()
        assert lock.acquire(timeout=30)
        order.append("late")
        lock.release()

    def use(booking: object, name: str) -> None:
        hold(booking)  # type: ignore[arg-type]
        assert lock.acquire(timeout=30)
        order.append(name)
        lock.release()

    t_late = threading.Thread(target=late)
    t_late.start()
    late_started.wait()
    while lock.waiting() < 3:  # two bookings and the late caller
        time.sleep(0.001)
    t_second = threading.Thread(target=use, args=(second, "second"))
    t_second.start()
    lock.release()  # the lock goes to the first booking, which holds it until claimed or cancelled
    assert lock.owner == "first" and order == []
    use(first, "first")
    for t in (t_second, t_late):
        t.join(30)
    assert order == ["first", "second", "late"]


def test_cancelling_a_granted_booking_passes_the_lock_on() -> None:
    lock = FifoLock()
    booking = lock.reserve("me")
    got = threading.Event()

    def waiter() -> None:
        assert lock.acquire(timeout=30)
        got.set()
        lock.release()

    t = threading.Thread(target=waiter)
    t.start()
    while lock.waiting() < 1:
        time.sleep(0.001)
    booking.cancel()
    booking.cancel()  # idempotent
    t.join(30)
    assert got.is_set() and not lock.locked()


def test_cancelling_a_queued_booking_leaves_the_line() -> None:
    lock = FifoLock()
    assert lock.acquire()
    booking = lock.reserve("me")
    assert lock.waiting() == 1
    booking.cancel()
    assert lock.waiting() == 0
    lock.release()
    assert not lock.locked()


async def test_a_booking_is_claimed_by_a_task_the_chain_started() -> None:
    lock = FifoLock()
    assert lock.acquire(owner="runner")
    booking = lock.reserve("parent")
    hold(booking)

    async def child() -> str:
        assert await lock.acquire_async(timeout=30)  # inherits the booking through the context
        lock.release()
        return "done"

    task = asyncio.ensure_future(child())
    await asyncio.sleep(0)
    stranger = asyncio.ensure_future(lock.acquire_async(timeout=30, owner="stranger"))
    await asyncio.sleep(0)
    lock.release()  # to the booking, claimed by the child task
    assert await asyncio.wait_for(task, 30) == "done"
    assert await asyncio.wait_for(stranger, 30)
    lock.release()
    unhold(booking)
