"""The model manager against the simulator: swapping, budgets, thread safety.

Every claim is checked with the simulator's own counters (inits, destroys,
live handles, destroy-while-running), not with the manager's view of itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_core.errors import BusyError, ContextLengthError, InvalidParameterError, ModelNotFoundError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.params import InitParams, SamplingParams
from rkllm_core.sim import SimulatorControl, make_model

NAMES = {
    "qwen3-0.6b": "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm",
    "gemma3-270m": "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx2048-rk3588.rkllm",
    "gemma3-1b": "gemma-3-1b-it_w8a8.rkllm",
}


def echo(prompt: str) -> str:
    return f"Echo: {prompt} — ok."


@pytest.fixture
def models(model_dir: Path) -> Path:
    for i, filename in enumerate(NAMES.values()):
        make_model(model_dir, filename, size_mb=100 * (i + 1))
    return model_dir


@pytest.fixture
def make_manager(models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[type[ModelManager]]:
    made: list[ModelManager] = []

    def factory(**kwargs: object) -> ModelManager:
        kwargs.setdefault("library", sim_lib)
        m = ModelManager(ModelRegistry([models], platform=None), **kwargs)  # type: ignore[arg-type]
        made.append(m)
        return m

    yield factory  # type: ignore[misc]
    for m in made:
        m.close()


def run(manager: ModelManager, name: str, prompt: str) -> str:
    with manager.lease(name) as lease:
        result = lease.runtime.generate(prompt)
        lease.record_stats(result.stats)
        return result.text


def test_repeated_requests_never_reinit(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    m = make_manager()
    for i in range(5):
        assert run(m, "qwen3-0.6b", f"p{i}") == echo(f"p{i}")
    assert sim.counter("inits") == 1
    assert m.stats["loads"] == 1 and m.stats["hits"] == 4


def test_budget_one_swaps_lru(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    m = make_manager(max_loaded=1)
    run(m, "qwen3-0.6b", "a")
    run(m, "gemma3-270m", "b")
    assert sim.counter("inits") == 2 and sim.counter("destroys") == 1
    assert [e.info.name for e in m.loaded()] == ["gemma3-270m"]
    assert m.is_loaded("gemma3-270m") and not m.is_loaded("qwen3-0.6b")


def test_budget_two_evicts_least_recently_used(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    m = make_manager(max_loaded=2)
    run(m, "qwen3-0.6b", "a")
    run(m, "gemma3-270m", "b")
    run(m, "qwen3-0.6b", "c")  # qwen is now the most recently used
    run(m, "gemma3-1b", "d")  # evicts gemma3-270m
    assert sorted(e.info.name for e in m.loaded()) == ["gemma3-1b", "qwen3-0.6b"]
    assert sim.counter("inits") == 3 and sim.counter("destroys") == 1


def test_memory_budget(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    # Files are 100, 200 and 300 MB: a 350 MB budget holds qwen (100) + gemma3-270m (200) only.
    m = make_manager(max_loaded=None, memory_budget_mb=350)
    run(m, "qwen3-0.6b", "a")
    run(m, "gemma3-270m", "b")
    assert len(m.loaded()) == 2
    run(m, "gemma3-1b", "c")
    assert [e.info.name for e in m.loaded()] == ["gemma3-1b"]
    assert sim.counter("destroys") == 2


def test_swap_waits_for_the_running_generation(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    m = make_manager(max_loaded=1)
    first_done = threading.Event()
    result: dict[str, object] = {}
    started = threading.Event()

    def long_run() -> None:
        with m.lease("qwen3-0.6b") as lease:
            stream = lease.runtime.stream("count to 150")
            started.set()
            chunks = list(stream)
            result["text"] = "".join(c.text for c in chunks)
            result["reason"] = chunks[-1].finish_reason
            first_done.set()

    t = threading.Thread(target=long_run)
    t.start()
    started.wait(5)
    assert run(m, "gemma3-270m", "b") == echo("b")  # blocks until the long run has finished
    assert first_done.is_set(), "the swap did not wait for the running generation"
    t.join(5)
    assert result["reason"] == "stop", "the swap aborted someone else's generation"
    assert result["text"] == " ".join(str(i) for i in range(1, 151))
    assert sim.counter("aborts") == 0 and sim.counter("destroy_while_running") == 0


def test_same_model_loaded_once_under_contention(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    sim.set("init_delay_ms", 50)
    m = make_manager(max_loaded=2)
    barrier = threading.Barrier(8)
    out: list[str] = []

    def go(i: int) -> None:
        barrier.wait()
        out.append(run(m, "qwen3-0.6b", f"t{i}"))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(out) == sorted(echo(f"t{i}") for i in range(8))
    assert sim.counter("inits") == 1


@pytest.mark.parametrize("budget", [1, 2])
def test_threads_times_models_stress(make_manager: type[ModelManager], sim: SimulatorControl, budget: int) -> None:
    sim.set("token_delay_ms", 0.05)
    m = make_manager(max_loaded=budget)
    names = list(NAMES)
    errors: list[BaseException] = []
    base_live = sim.counter("live_handles")  # handles other tests' long-lived managers may hold
    peak_live = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak_live
        while not stop.is_set():
            peak_live = max(peak_live, sim.counter("live_handles") - base_live)
            time.sleep(0.0005)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for j in range(6):
                name = rng.choice(names)
                prompt = f"w{seed}-{j}-{name}"
                assert run(m, name, prompt) == echo(prompt)
        except BaseException as exc:  # reported below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    watcher.join()
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert peak_live <= budget
    assert sim.counter("inits") == m.stats["loads"] and sim.counter("destroys") == m.stats["unloads"]
    m.close()
    assert sim.counter("live_handles") == base_live


def test_waiting_for_room_times_out(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    m = make_manager(max_loaded=1)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with m.lease("qwen3-0.6b"):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with pytest.raises(BusyError, match="in use"):
        m.lease("gemma3-270m", timeout=0.05)
    release.set()
    t.join(5)
    assert run(m, "gemma3-270m", "now") == echo("now")


def test_self_deadlock_is_an_error_not_a_hang(make_manager: type[ModelManager]) -> None:
    m = make_manager(max_loaded=1)
    nested = "MainThread.* holds qwen3-0.6b and asks for gemma3-270m"
    with m.lease("qwen3-0.6b"), pytest.raises(BusyError, match=nested):
        m.lease("gemma3-270m")


def test_context_above_limit_is_refused_before_init(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    m = make_manager()
    with pytest.raises(ContextLengthError) as info:
        m.lease("gemma3-270m", InitParams(max_context_len=4096))
    assert "4096" in str(info.value) and "2048" in str(info.value)
    assert info.value.requested == 4096 and info.value.limit == 2048
    assert sim.counter("inits") == 0 and sim.counter("init_failures") == 0
    with m.lease("gemma3-270m") as lease:  # the default is the model's own limit
        assert lease.runtime.max_context_len == 2048


def test_unknown_name_suggests(make_manager: type[ModelManager]) -> None:
    m = make_manager()
    with pytest.raises(ModelNotFoundError) as info:
        m.lease("qwen3-06b")
    assert isinstance(info.value, LookupError)
    assert "qwen3-0.6b" in str(info.value)


def test_sampling_policy_per_abi(make_manager: type[ModelManager], sim: SimulatorControl, abi: str) -> None:
    m = make_manager(max_loaded=1)
    cold, hot = (
        InitParams(sampling=SamplingParams(temperature=0.1)),
        InitParams(sampling=SamplingParams(temperature=1.2)),
    )
    for params in (cold, hot, cold):
        with m.lease("qwen3-0.6b", params) as lease:
            lease.runtime.generate("x")
    # 1.2: sampling is fixed at init, so each change re-initialises (budget 1); 1.3: one instance.
    assert sim.counter("inits") == (3 if abi == "1.2" else 1)


def test_unload_and_close_reverse_order(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    sim.set("trace", 1)
    base_live = sim.counter("live_handles")
    m = make_manager(max_loaded=3)
    for name in NAMES:
        run(m, name, "x")
    handles = [t["handle"] for t in sim.trace() if t["fn"] == "rkllm_run"]  # in load order
    assert m.unload("gemma3-1b") == 1
    assert m.unload("gemma3-1b") == 0
    m.close()
    destroys = [t["handle"] for t in sim.trace() if t["fn"] == "rkllm_destroy"]
    assert destroys == [handles[2], handles[1], handles[0]]
    assert sim.counter("live_handles") == base_live


def test_load_failure_leaves_the_manager_usable(
    make_manager: type[ModelManager], models: Path, sim: SimulatorControl
) -> None:
    (models / "broken-ctx4096.rkllm").write_bytes(b"not a model")
    m = make_manager()
    from rkllm_core.errors import InitError

    with pytest.raises(InitError):
        m.lease("broken")
    assert m.loaded() == [] and m.stats["load_failures"] == 1
    assert run(m, "qwen3-0.6b", "ok") == echo("ok")


def test_longrope_needs_runtime_1_2_2(make_manager: type[ModelManager], models: Path, sim_lib: RuntimeLibrary) -> None:
    make_model(models, "Qwen2.5-7B-Instruct-1M-w8a8-ctx32768-rk3588.rkllm")
    old = dataclasses.replace(sim_lib, version="1.2.1")
    m = make_manager(library=old)
    with pytest.raises(InvalidParameterError, match="1.2.2"):
        m.lease("qwen2.5-7b-1m")  # the 1M-context model is its own model


def test_platform_mismatch_warns(make_manager: type[ModelManager]) -> None:
    m = make_manager()
    m._board_platform = "rk3576"
    with pytest.warns(RuntimeWarning, match="rk3588"), m.lease("qwen3-0.6b"):
        pass


def test_measured_memory_replaces_the_estimate(make_manager: type[ModelManager]) -> None:
    m = make_manager()
    run(m, "qwen3-0.6b", "x")
    entry = m.loaded()[0]
    assert entry.measured_mb is not None and entry.measured_mb > 0
    assert entry.load_time_s > 0


# -- tasks -------------------------------------------------------------------------------------------------


async def test_tasks_are_owners_and_wait_without_threads(
    make_manager: type[ModelManager], sim: SimulatorControl
) -> None:
    m = make_manager(max_loaded=1)
    async with m.alease("qwen3-0.6b") as lease:
        assert lease.owner is asyncio.current_task()
        threads = threading.active_count()
        # Tasks that are not part of this request (started in a context of their own) wait for the room.
        waiters = [asyncio.create_task(_use(m, "gemma3-270m"), context=contextvars.Context()) for _ in range(20)]
        await asyncio.sleep(0.05)
        assert m.waiting() == 20 and threading.active_count() == threads  # twenty waits, no thread parked
        nested = "holds qwen3-0.6b and asks for gemma3-270m"
        with pytest.raises(BusyError, match=nested):  # but this task asking for it would wait for itself
            await m.alease("gemma3-270m")
        with pytest.raises(BusyError, match=nested):  # and so would a task it starts (and awaits) from here
            await asyncio.create_task(_use(m, "gemma3-270m"))
    assert await asyncio.gather(*waiters) == ["gemma3-270m"] * 20
    assert sim.counter("inits") == 2 and m.waiting() == 0


async def _use(m: ModelManager, name: str, timeout: float = 10) -> str:
    async with m.alease(name, timeout=timeout) as lease:
        return lease.info.name


async def test_a_cancelled_or_timed_out_async_wait_leaves_the_line(make_manager: type[ModelManager]) -> None:
    m = make_manager(max_loaded=1)
    held = m.lease("qwen3-0.6b")  # taken by this task: the waits below are other, unrelated tasks'
    try:
        task = asyncio.create_task(_use(m, "gemma3-270m"), context=contextvars.Context())
        await asyncio.sleep(0.02)
        assert m.waiting() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.waiting() == 0
        with pytest.raises(BusyError) as timed_out:
            await asyncio.create_task(_use(m, "gemma3-270m", timeout=0.02), context=contextvars.Context())
        assert timed_out.value.reason == "timeout" and m.waiting() == 0
    finally:
        held.release()
    assert await _use(m, "gemma3-270m") == "gemma3-270m"


def test_unload_waits_for_a_model_still_loading(make_manager: type[ModelManager], sim: SimulatorControl) -> None:
    sim.set("init_delay_ms", 100)
    m = make_manager()
    t = threading.Thread(target=lambda: m.lease("qwen3-0.6b").release())
    t.start()
    while not m.loaded():
        time.sleep(0.001)
    assert m.unload("qwen3-0.6b", timeout=5) == 1  # the request that started the load was served first
    t.join(5)
    assert sim.counter("inits") == 1 and sim.counter("destroys") == 1 and not m.loaded()


async def test_a_sync_lease_from_async_code_blocks_instead_of_breaking(make_manager: type[ModelManager]) -> None:
    m = make_manager(max_loaded=1)
    held = threading.Event()

    def hold_briefly() -> None:
        with m.lease("qwen3-0.6b"):
            held.set()
            time.sleep(0.05)

    t = threading.Thread(target=hold_briefly)
    t.start()
    held.wait(5)
    with m.lease("gemma3-270m", timeout=5) as lease:  # waits on a thread event (blocking this loop), then swaps
        assert lease.info.name == "gemma3-270m"
    t.join(5)
