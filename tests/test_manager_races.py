"""Promises of the model manager that only races break, each in a loop.

Every loop runs ``RKLLM_RACE_LOOPS`` rounds (default 20): a race that breaks a
promise in 1 run of 6 is caught with probability 1 - (5/6)**20 > 0.97, and
``RKLLM_RACE_LOOPS=200`` makes a long hunt.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

LOOPS = int(os.environ.get("RKLLM_RACE_LOOPS", "20"))
A, B = "qwen3-0.6b", "gemma3-270m"


@pytest.fixture
def manager(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ModelManager]:
    make_model(model_dir, "Qwen3-0.6B-w8a8-rk3588.rkllm", size_mb=1)
    make_model(model_dir, "gemma-3-270m-it_w8a8.rkllm", size_mb=1)
    m = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=1)
    yield m
    m.close()


def _until(cond: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Wait for a state change another thread makes (bounded only against a hang, never a margin)."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.001)


def _after(barrier: threading.Barrier, fn: Callable[..., object], *args: object) -> None:
    barrier.wait()
    fn(*args)


def _load(m: ModelManager, name: str) -> None:
    with m.lease(name) as lease:
        lease.runtime.generate("warm")


def test_the_request_that_triggers_a_swap_is_served_first(manager: ModelManager, sim: SimulatorControl) -> None:
    """Three threads ask for a model that must be swapped in: they use it in arrival order."""
    sim.set("init_delay_ms", 20)
    for _ in range(LOOPS):
        _load(manager, A)
        order: list[str] = []
        errors: list[BaseException] = []
        threads = []
        for i, who in enumerate("ABC"):
            t = threading.Thread(target=_ask_in_thread, args=(manager, who, order, errors))
            t.start()
            threads.append(t)
            _until(lambda n=i + 1, seen=order: manager.waiting() + len(seen) >= n, f"{who} in line")
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert order == ["A", "B", "C"]


def _ask_in_thread(manager: ModelManager, who: str, order: list[str], errors: list[BaseException]) -> None:
    try:
        with manager.lease(B, timeout=60) as lease, lease.runtime.session(timeout=60) as s:
            order.append(who)
            s.generate(who)
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


async def _ask_in_task(manager: ModelManager, who: str, order: list[str]) -> None:
    async with manager.alease(B, timeout=60) as lease, lease.runtime.session(timeout=60) as s:
        order.append(who)
        async for _ in s.astream(who):
            pass


async def test_the_task_that_triggers_a_swap_is_served_first(manager: ModelManager, sim: SimulatorControl) -> None:
    """The same with tasks, whose load runs on the core's executor."""
    sim.set("init_delay_ms", 20)
    for _ in range(LOOPS):
        await asyncio.to_thread(_load, manager, A)
        order: list[str] = []
        tasks = []
        for i, who in enumerate("ABC"):
            tasks.append(asyncio.create_task(_ask_in_task(manager, who, order)))
            while manager.waiting() + len(order) < i + 1:
                await asyncio.sleep(0.001)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert order == ["A", "B", "C"]


def test_unload_racing_a_load_never_holds_two_models(manager: ModelManager, sim: SimulatorControl) -> None:
    """With max_loaded=1, unload(A) in one thread while another asks for B: never two models in memory."""
    sim.set("destroy_delay_ms", 5)
    sim.reset()
    for _ in range(LOOPS):
        _load(manager, A)
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=_after, args=(barrier, manager.unload, A)),
            threading.Thread(target=_after, args=(barrier, _load, manager, B)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        manager.unload(B, timeout=60)
        assert sim.counter("max_resident_handles") <= 1


def test_a_load_waits_until_an_unloaded_model_is_destroyed(manager: ModelManager, sim: SimulatorControl) -> None:
    """B is asked for while A's handle is being destroyed: B's init starts only after A's memory is free."""
    sim.set("destroy_delay_ms", 10)
    for _ in range(LOOPS):
        _load(manager, A)
        sim.reset()
        unloader = threading.Thread(target=manager.unload, args=(A,), kwargs={"timeout": 60})
        unloader.start()
        _until(lambda: not manager.loaded(), "A taken out of service")
        _load(manager, B)
        unloader.join(60)
        manager.unload(B, timeout=60)
        assert sim.counter("max_resident_handles") <= 1


def test_a_handle_its_user_closed_mid_run_keeps_its_room_until_destroyed(
    manager: ModelManager, sim: SimulatorControl
) -> None:
    """A user closes A's handle during a run (the destroy waits for the run): B loads only after it."""
    sim.set("token_delay_ms", 1)
    for _ in range(LOOPS):
        sim.reset()
        with manager.lease(A) as lease:
            stream = lease.runtime.stream("a long answer " * 8)
            next(iter(stream))
            lease.runtime.close(timeout=0)  # aborts the run; the handle is destroyed once it returns
            asker = threading.Thread(target=_load, args=(manager, B))
            asker.start()
            stream.close()
        asker.join(60)
        assert not asker.is_alive()
        manager.unload(B, timeout=60)
        assert sim.counter("max_resident_handles") <= 1


async def test_cancelled_and_failed_requests_never_break_the_budget(
    manager: ModelManager, sim: SimulatorControl, model_dir: Path
) -> None:
    """Tasks for two models, some cancelled mid-load, one model that fails to load: at most one in memory."""
    (model_dir / "broken-1b-w8a8.rkllm").write_bytes(b"not a model")
    manager.registry.refresh()
    sim.set("init_delay_ms", 3)
    sim.set("destroy_delay_ms", 3)
    sim.reset()

    async def use(name: str) -> None:
        async with manager.alease(name, timeout=60) as lease:
            async for _ in lease.runtime.astream("hi"):
                pass

    for i in range(LOOPS):
        names = [A, B, "broken-1b", B, A, B]
        tasks = [asyncio.create_task(use(n)) for n in names]
        await asyncio.sleep(0.004 * (i % 3))
        tasks[i % len(tasks)].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert all(r is None or isinstance(r, asyncio.CancelledError | Exception) for r in results)
        assert manager.waiting() == 0
    assert sim.counter("max_resident_handles") <= 1
    assert sim.counter("init_failures") >= 1


async def test_a_bad_timeout_is_refused_without_blocking_the_line(manager: ModelManager) -> None:
    """A request with an invalid timeout never enters the line, so nobody waits behind it."""
    for bad in ("soon", float("nan")):
        with pytest.raises((TypeError, ValueError)):
            manager.lease(A, timeout=bad)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError)):
            await manager.alease(A, timeout=bad)  # type: ignore[arg-type]
    assert manager.waiting() == 0
    await asyncio.to_thread(_load, manager, A)


def test_ctrl_c_right_after_rkllm_init_loses_no_handle(
    manager: ModelManager, sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt between rkllm_init's return and the handle's bookkeeping destroys the new handle."""
    from rkllm_core.runtime import handle as handle_module

    real = handle_module._HandleState.__init__
    calls = {"n": 0}

    def interrupted(self: object, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(handle_module._HandleState, "__init__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        manager.lease(A)
    assert sim.counter("live_handles") == 0 and manager.waiting() == 0
    _load(manager, A)  # the line did not stall
    assert sim.counter("inits") == 2


def test_ctrl_c_before_a_load_is_published_fails_the_waiters_and_frees_the_line(
    manager: ModelManager, sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rkllm_core.errors import RKLLMError
    from rkllm_core.models import manager as manager_module
    from rkllm_core.models.line import LinePolicy

    real_runtime = manager_module.RKLLMRuntime

    def runtime_once_both_wait(*args: object, **kwargs: object) -> object:
        if not calls["n"]:  # the first load: hold it until a second request waits for it
            _until(lambda: manager.waiting() == 2, "a second request waiting for this load")
        return real_runtime(*args, **kwargs)  # type: ignore[arg-type]

    calls = {"n": 0}
    monkeypatch.setattr(manager_module, "RKLLMRuntime", runtime_once_both_wait)
    real = LinePolicy.loaded

    def interrupted(self: LinePolicy, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LinePolicy, "loaded", interrupted)
    outcomes: dict[str, BaseException | None] = {}

    def ask(who: str) -> None:
        try:
            _load(manager, A)
            outcomes[who] = None
        except BaseException as exc:
            outcomes[who] = exc

    loader = threading.Thread(target=ask, args=("loader",))
    loader.start()
    _until(lambda: manager.waiting() == 1, "the loader in line")
    waiter = threading.Thread(target=ask, args=("waiter",))  # arrives while the load is under way
    waiter.start()
    for t in (loader, waiter):
        t.join(60)
    assert isinstance(outcomes["loader"], KeyboardInterrupt)  # the interrupted caller gets its interrupt
    assert isinstance(outcomes["waiter"], RKLLMError)  # the one waiting for that load gets an error
    assert "interrupted" in str(outcomes["waiter"])
    assert sim.counter("live_handles") == 0 and manager.waiting() == 0
    _load(manager, A)  # the line goes on
    assert sim.counter("live_handles") == 1
