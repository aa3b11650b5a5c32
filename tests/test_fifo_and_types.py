"""Pure-Python units: owners, waiters, the FIFO lock, the core's executor, and the parameter types."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rkllm_core._sync import Deadline, FifoLock, Waiter, current_owner, native_executor, offload
from rkllm_core.errors import InvalidParameterError
from rkllm_core.params import InitParams, PerfStats, SamplingParams


def test_fifo_order_across_threads() -> None:
    lock = FifoLock()
    assert lock.acquire()
    order: list[int] = []

    def worker(i: int) -> None:
        lock.acquire()
        order.append(i)
        lock.release()

    threads = []
    for i in range(8):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        while lock.waiting() != i + 1:
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == list(range(8))
    assert not lock.locked()


def test_timeout_leaves_the_queue() -> None:
    lock = FifoLock()
    lock.acquire()
    assert lock.acquire(timeout=0.01) is False
    assert lock.waiting() == 0
    lock.release()
    assert lock.acquire(timeout=0.01) is True
    lock.release()


def test_release_from_another_thread() -> None:
    lock = FifoLock()
    lock.acquire()
    t = threading.Thread(target=lock.release)
    t.start()
    t.join()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_async_and_thread_waiters_share_one_line() -> None:
    lock = FifoLock()
    lock.acquire()
    order: list[str] = []

    async def a(name: str) -> None:
        await lock.acquire_async()
        order.append(name)
        lock.release()

    t1 = asyncio.create_task(a("async1"))
    await asyncio.sleep(0.01)
    th = threading.Thread(target=lambda: (lock.acquire(), order.append("thread"), lock.release()))
    th.start()
    while lock.waiting() != 2:
        await asyncio.sleep(0.001)
    t2 = asyncio.create_task(a("async2"))
    await asyncio.sleep(0.01)
    lock.release()
    await asyncio.gather(t1, t2)
    th.join(5)
    assert order == ["async1", "thread", "async2"]


async def test_cancelled_async_waiter_passes_the_lock_on() -> None:
    lock = FifoLock()
    lock.acquire()
    task = asyncio.create_task(lock.acquire_async())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lock.waiting() == 0
    lock.release()
    assert not lock.locked()
    assert await lock.acquire_async(timeout=0.01)
    assert await lock.acquire_async(timeout=0.01) is False
    lock.release()


async def test_owners_are_tasks_not_the_threads_they_run_on() -> None:
    here = current_owner()
    assert here is asyncio.current_task()
    task_owner = await asyncio.create_task(_owner_of_task())
    assert task_owner is not here and isinstance(task_owner, asyncio.Task)
    thread_owner = await asyncio.to_thread(current_owner)
    assert isinstance(thread_owner, threading.Thread) and thread_owner is not threading.main_thread()


async def _owner_of_task() -> object:
    return current_owner()


def test_the_lock_records_its_owner_and_hands_it_on() -> None:
    lock = FifoLock()
    assert lock.acquire() and lock.owner is threading.current_thread()
    got: list[object] = []

    def waiter() -> None:
        lock.acquire()
        got.append(lock.owner)
        lock.release()

    t = threading.Thread(target=waiter)
    t.start()
    while lock.waiting() == 0:
        time.sleep(0.001)
    lock.release()
    t.join(5)
    assert got == [t] and lock.owner is None and not lock.locked()
    assert lock.try_acquire() and not FifoLock().locked()
    assert not lock.try_acquire()
    lock.release()


async def test_awaiting_a_waiter_occupies_no_thread() -> None:
    loop = asyncio.get_running_loop()
    waiter = Waiter(loop=loop)
    threads_before = threading.active_count()
    pending = [asyncio.create_task(Waiter(loop=loop).wait_async(0.05)) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert threading.active_count() == threads_before  # fifty waits, no thread for any of them
    assert await asyncio.gather(*pending) == [False] * 50  # all timed out
    threading.Timer(0.01, waiter.wake).start()
    assert await waiter.wait_async(5) is True


async def test_a_sync_wait_from_async_code_blocks_instead_of_breaking() -> None:
    lock = FifoLock()
    assert lock.acquire()
    threading.Timer(0.05, lock.release).start()
    assert lock.acquire(timeout=5)  # a thread waiter, though a loop runs here (the loop blocks meanwhile)
    lock.release()


def test_deadline() -> None:
    assert Deadline(None).remaining() is None and not Deadline(None).expired
    d = Deadline(0)
    assert d.remaining() == 0 and d.expired
    assert 0 < (Deadline(10).remaining() or 0) <= 10
    with pytest.raises(TypeError):
        Deadline("soon")  # type: ignore[arg-type]


async def test_offload_runs_on_the_core_executor_and_a_cancel_does_not_stop_the_call() -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def native_call() -> str:
        started.set()
        release.wait(5)
        finished.set()
        return threading.current_thread().name

    assert (await offload(threading.current_thread)).name.startswith("rkllm-native")
    task = asyncio.create_task(offload(native_call))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not finished.is_set()  # the caller left at once
    release.set()
    await asyncio.to_thread(finished.wait, 5)
    assert finished.is_set()  # and the call still ran to its end
    assert native_executor() is native_executor()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_k": -1},
        {"top_k": 1.5},
        {"repeat_penalty": 0},
        {"mirostat": 3},
        {"frequency_penalty": 5},
        {"temperature": "hot"},
        {"top_k": True},
    ],
)
def test_invalid_sampling_is_rejected_with_the_field_name(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert next(iter(kwargs)) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_sampling_merge() -> None:
    base = SamplingParams(temperature=0.7, top_k=20)
    merged = base.merged(SamplingParams(top_k=5, top_p=0.9))
    assert merged == SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    assert SamplingParams().is_empty() and not merged.is_empty()


def test_init_params_validation() -> None:
    with pytest.raises(InvalidParameterError, match="max_context_len"):
        InitParams(max_context_len=0)
    with pytest.raises(InvalidParameterError, match="n_batch"):
        InitParams(n_batch=0)
    assert InitParams(max_context_len=4096).max_context_len == 4096


def test_perf_rates() -> None:
    s = PerfStats(100.0, 50, 2000.0, 40, 600.0)
    assert s.prefill_tokens_per_s == 500.0 and s.decode_tokens_per_s == 20.0
    assert PerfStats(0, 0, 0, 0, 0).decode_tokens_per_s == 0.0
