"""Concurrency, cancellation and conversation isolation, the way applications load the core.

Threads and asyncio tasks share models; every test ends with the simulator's
own counters (the ``sim`` fixture): no call on a destroyed handle, no
overlapping runs, no destroy during a run, no leaked handle.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, closing
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.chat.engine import ChatDone, ChatEngine, TextDelta
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.options import ChatOptions
from rkllm_core.errors import BusyError, HandleClosedError
from rkllm_core.models.manager import ModelManager, set_default_manager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

FILES = {
    "qwen3-0.6b": "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm",
    "qwen2.5-0.5b": "Qwen_Qwen2.5-0.5B-Instruct-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm",
    "gemma3-270m": "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm",
}
MODELS = list(FILES)


def U(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def echo(prompt: str) -> str:
    return f"Echo: {prompt} — ok."


@pytest.fixture
def models(model_dir: Path) -> Path:
    for i, (name, filename) in enumerate(FILES.items()):
        make_model(model_dir, filename, size_mb=100 * (i + 1), think=name == "qwen3-0.6b")
    return model_dir


@pytest.fixture
def make_manager(models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[Callable[..., ModelManager]]:
    made: list[ModelManager] = []

    def factory(**kwargs: Any) -> ModelManager:
        m = ModelManager(ModelRegistry([models], platform=None), library=sim_lib, **kwargs)
        made.append(m)
        return m

    yield factory
    for m in made:
        assert m.waiting() == 0, "a request was left in the manager's line"
        for entry in m.loaded():
            assert entry.leases == 0, f"a lease on {entry.info.name} was never released"
            if entry.runtime is not None and not entry.runtime.closed:
                state = entry.runtime._state
                deadline = time.monotonic() + 5  # an aborted run (an async stream let go) ends on its own
                while state.current is not None and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert not state.lock.locked() and state.lock.waiting() == 0, (
                    f"a handle was left held by {state.lock.owner!r} (pending={state.release_pending}, "
                    f"run={state.current!r}, jobs={state.jobs}, waiting={state.lock.waiting()})"
                )
        m.close()


def describe(manager: ModelManager) -> str:
    """The manager's line and entries, for a failure message."""
    with manager._mutex:
        line = manager._policy
        lines = [f"acting: {line.acting and line.acting.info.name}; dying: {[e.info.name for e in line.dying]}"]
        for e in line.entries.values():
            lines.append(f"entry {e.info.name}: loading={e.loading} leases={e.leases} holders={dict(e.holders)}")
        for r in line.line:
            victims = [v.info.name for v in r.victims or ()]
            granted = r.granted is not None
            lines.append(f"req {r.info.name} {r.state} owner={r.owner!r} granted={granted} victims={victims}")
    import sys
    import traceback

    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame)[-6:])
        if "rkllm_core" in stack:
            lines.append(f"--- thread {ident}\n{stack}")
    return "\n".join(lines)


def no_violations(sim: SimulatorControl) -> None:
    assert sim.counter("invalid_handle_calls") == 0
    assert sim.counter("concurrent_run_violations") == 0
    assert sim.counter("destroy_while_running") == 0


# -- the done-when load: 64 requests, threads and tasks, two models, the default manager --------------------


@pytest.mark.parametrize("small_executor", [False, True], ids=["default-executor", "executor-of-2"])
def test_64_requests_threads_and_tasks_two_models_default_manager(
    models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, small_executor: bool
) -> None:
    sim.set("token_delay_ms", 1)
    manager = ModelManager(ModelRegistry([models], platform=None), library=sim_lib)  # defaults: max_loaded=1
    previous = set_default_manager(manager)
    try:
        engine = ChatEngine(prompt_cache=False)  # no manager given: the process-wide default
        assert engine.manager is manager
        answers: dict[str, str] = {}
        errors: list[BaseException] = []

        def ask(i: int) -> None:
            prompt = f"thread request {i}"
            try:
                answers[prompt] = engine.chat(MODELS[i % 2], [U(prompt)]).message.content
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)

        async def ask_async(i: int) -> None:
            prompt = f"task request {i}"
            answers[prompt] = (await engine.achat(MODELS[(i + 1) % 2], [U(prompt)])).message.content

        async def main() -> None:
            if small_executor:
                asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
            for t in threads:
                t.start()
            await asyncio.wait_for(asyncio.gather(*(ask_async(i) for i in range(32))), 60)
            for t in threads:
                await asyncio.to_thread(t.join, 60)

        asyncio.run(main())
        assert not errors, errors
        assert len(answers) == 64 and all(answer == echo(prompt) for prompt, answer in answers.items())
        assert manager.waiting() == 0
    finally:
        set_default_manager(previous)
        manager.close()
    no_violations(sim)


# -- the torture test ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_models", "budget"),
    [
        (1, {"max_loaded": 1}),
        (2, {"max_loaded": 1}),
        (3, {"max_loaded": 2}),
        (3, {"max_loaded": None, "memory_budget_mb": 450}),
    ],
    ids=["1-model", "2-models-max1", "3-models-max2", "3-models-450MB"],
)
def test_torture_threads_and_tasks(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl, n_models: int, budget: dict[str, Any]
) -> None:
    """Random mixes of every way in, with cancels, timeouts, aborts and early breaks; answers stay true."""
    sim.set("token_delay_ms", 1)
    sim.set("init_delay_ms", 2)
    manager = make_manager(**budget)
    engine = ChatEngine(manager, prompt_cache=False)
    names = MODELS[:n_models]
    seed = random.randrange(1 << 30)
    failures: list[str] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def note(kind: str) -> None:
        with lock:
            outcomes[kind] = outcomes.get(kind, 0) + 1

    def failed(op: str, exc: Exception) -> None:
        if isinstance(exc, BusyError) and op == "timeout" and exc.reason == "timeout":
            note("busy")  # a timeout that ran out: an expected outcome
        else:
            failures.append(f"{op}: {exc!r}")

    def check(prompt: str, text: str, *, whole: bool) -> None:
        expected = echo(prompt)
        if (whole and text != expected) or not expected.startswith(text):
            failures.append(f"{prompt!r} got {text!r}")

    def thread_worker(w: int) -> None:
        rng = random.Random(seed + w)
        for i in range(12):
            model, prompt = rng.choice(names), f"thread {w} op {i} {rng.random():.6f}"
            op = rng.choice(["chat", "stream", "break", "lease", "timeout"])
            try:
                if op == "chat":
                    check(prompt, engine.chat(model, [U(prompt)]).message.content, whole=True)
                elif op == "stream":
                    text = "".join(e.text for e in engine.stream(model, [U(prompt)]) if isinstance(e, TextDelta))
                    check(prompt, text, whole=True)
                elif op == "break":
                    with closing(engine.stream(model, [U(prompt)])) as events:
                        for event in events:
                            if isinstance(event, TextDelta):
                                check(prompt, event.text, whole=False)
                                break
                elif op == "lease":
                    with manager.lease(model) as lease:
                        check(prompt, lease.runtime.generate(prompt).text, whole=True)
                else:
                    opts = ChatOptions(timeout=rng.choice([0.0, 0.001, 0.02]))
                    check(prompt, engine.chat(model, [U(prompt)], opts).message.content, whole=True)
                note(op)
            except Exception as exc:  # noqa: BLE001 - judged and reported
                failed(op, exc)

    async def first_then_hang(model: str, prompt: str) -> None:
        async with aclosing(engine.astream(model, [U(prompt)])) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    check(prompt, event.text, whole=False)
                    await asyncio.sleep(10)

    async def task_worker(w: int) -> None:
        rng = random.Random(seed + 1000 + w)
        for i in range(12):
            model, prompt = rng.choice(names), f"task {w} op {i} {rng.random():.6f}"
            op = rng.choice(["achat", "astream", "cancel-wait", "cancel-stream", "timeout", "gather"])
            try:
                if op == "achat":
                    check(prompt, (await engine.achat(model, [U(prompt)])).message.content, whole=True)
                elif op == "astream":
                    text = ""
                    async with aclosing(engine.astream(model, [U(prompt)])) as events:
                        async for event in events:
                            if isinstance(event, TextDelta):
                                text += event.text
                    check(prompt, text, whole=True)
                elif op == "cancel-wait":
                    task = asyncio.ensure_future(engine.achat(model, [U(prompt)]))
                    await asyncio.sleep(rng.random() * 0.01)
                    task.cancel()
                    try:
                        check(prompt, (await task).message.content, whole=True)
                    except asyncio.CancelledError:
                        pass
                elif op == "cancel-stream":
                    task = asyncio.ensure_future(first_then_hang(model, prompt))
                    await asyncio.sleep(rng.random() * 0.02)
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                elif op == "timeout":
                    opts = ChatOptions(timeout=rng.choice([0.0, 0.001, 0.02]))
                    check(prompt, (await engine.achat(model, [U(prompt)], opts)).message.content, whole=True)
                else:
                    prompts = [f"{prompt} #{k}" for k in range(3)]
                    replies = await asyncio.gather(*(engine.achat(rng.choice(names), [U(p)]) for p in prompts))
                    for p, r in zip(prompts, replies, strict=True):
                        check(p, r.message.content, whole=True)
                note(op)
            except Exception as exc:  # noqa: BLE001 - judged and reported
                failed(op, exc)

    async def main() -> None:
        threads = [threading.Thread(target=thread_worker, args=(w,), daemon=True) for w in range(4)]
        for t in threads:
            t.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(task_worker(w) for w in range(6))), 30)
            for t in threads:
                await asyncio.to_thread(t.join, 60)
                assert not t.is_alive()
        except (TimeoutError, AssertionError):
            pytest.fail(f"seed {seed}: stuck\n{describe(manager)}")

    asyncio.run(main())
    assert not failures, f"seed {seed}: {failures[:5]}"
    assert sum(outcomes.values()) == 4 * 12 + 6 * 12, outcomes
    no_violations(sim)


# -- conversations never bleed -----------------------------------------------------------------------------


def contexts(sim: SimulatorControl) -> list[str]:
    """What each run was conditioned on, in order (the simulator's KV text after prefill)."""
    return [t["context"] for t in sim.trace() if t["fn"] == "prefilled"]


def test_two_engines_on_one_manager_never_see_each_others_conversations(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("trace", 2)
    manager = make_manager()
    a, b = ChatEngine(manager, prompt_cache=False), ChatEngine(manager, prompt_cache=False)
    history_a = [ChatMessage("system", "You are Alice's assistant."), U("Alice asks one.")]
    reply = a.chat("qwen3-0.6b", history_a)
    history_a += [reply.message, U("Alice asks two.")]
    history_b = [ChatMessage("system", "You are Bob's assistant."), U("Bob asks one.")]
    b_reply = b.chat("qwen3-0.6b", history_b)
    second = a.chat("qwen3-0.6b", history_a)
    assert b_reply.message.content == echo("Bob asks one.") and second.message.content == echo("Alice asks two.")
    assert not second.kv_reused, "Bob's turn is in the KV cache: Alice's conversation must be rebuilt"
    seen_a1, seen_b, seen_a2 = contexts(sim)
    assert "Alice" not in seen_b, "Bob's model saw Alice's conversation"
    assert "Bob" not in seen_a2, "Alice's model saw Bob's conversation"
    for part in ("You are Alice's assistant.", "Alice asks one.", echo("Alice asks one.")):
        assert part in seen_a2
    # And the same engine continuing its own conversation right away reuses the cache.
    history_a += [second.message, U("Alice asks three.")]
    third = a.chat("qwen3-0.6b", history_a)
    assert third.kv_reused and "Bob" not in contexts(sim)[-1]


def test_a_direct_runtime_call_between_turns_forces_a_rebuild(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("trace", 2)
    manager = make_manager()
    engine = ChatEngine(manager, prompt_cache=False)
    history = [ChatMessage("system", "Keep this system prompt."), U("first question")]
    reply = engine.chat("qwen3-0.6b", history)
    with manager.lease("qwen3-0.6b") as lease:
        lease.runtime.generate("something unrelated")  # empties the KV cache (keep_history=0)
        epoch = lease.runtime.kv.epoch
    history += [reply.message, U("second question")]
    second = engine.chat("qwen3-0.6b", history)
    assert not second.kv_reused
    seen = contexts(sim)[-1]
    assert "Keep this system prompt." in seen and "first question" in seen and "unrelated" not in seen
    with manager.lease("qwen3-0.6b") as lease:
        assert lease.runtime.kv.epoch > epoch  # the engine's rebuild moved the epoch on


async def test_interleaved_async_conversations_each_see_only_their_own(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("trace", 2)
    sim.set("token_delay_ms", 1)
    manager = make_manager()
    engines = [ChatEngine(manager, prompt_cache=False) for _ in range(3)]

    async def converse(k: int) -> None:
        history = [ChatMessage("system", f"Persona-{k}."), U(f"user-{k} turn 0")]
        for turn in range(4):
            reply = await engines[k].achat("qwen3-0.6b", history)
            assert reply.message.content == echo(f"user-{k} turn {turn}")
            history += [reply.message, U(f"user-{k} turn {turn + 1}")]

    await asyncio.gather(*(converse(k) for k in range(3)))
    for seen in contexts(sim):
        personas = {k for k in range(3) if f"Persona-{k}." in seen}
        users = {k for k in range(3) if f"user-{k} " in seen}
        assert len(personas) == 1 and users == personas, seen


# -- cancellation, timeouts, fairness, nesting, closed handles -----------------------------------------------


async def test_cancelled_wait_for_a_model_leaves_the_line_at_once(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("token_delay_ms", 2)
    manager = make_manager(max_loaded=1)
    engine = ChatEngine(manager, prompt_cache=False)
    holder = asyncio.ensure_future(engine.achat("qwen3-0.6b", [U("count to 300")]))
    while sim.counter("runs") == 0:
        await asyncio.sleep(0.001)
    waiters = [asyncio.ensure_future(engine.achat(m, [U(m)])) for m in ("gemma3-270m", "qwen3-0.6b")]
    await asyncio.sleep(0.02)
    assert manager.waiting() >= 1
    for w in waiters:
        w.cancel()
    for w in waiters:
        with pytest.raises(asyncio.CancelledError):
            await w
    # Both left without waiting for the generation that blocks them.
    assert not holder.done() and manager.waiting() == 0
    assert (await holder).finish_reason == "stop"
    assert sim.counter("inits") == 1, "a cancelled swap request must not have unloaded anything"


def test_timeout_bounds_the_wait_for_room_and_for_the_handle(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("token_delay_ms", 2)
    manager = make_manager(max_loaded=1)
    engine = ChatEngine(manager, prompt_cache=False)
    started = threading.Event()

    def long_run() -> None:
        events = []
        for event in engine.stream("qwen3-0.6b", [U("count to 200")]):
            started.set()
            events.append(event)
        assert isinstance(events[-1], ChatDone)

    t = threading.Thread(target=long_run)
    t.start()
    started.wait(10)
    with pytest.raises(BusyError) as room:  # needs a swap: waits for room
        engine.chat("gemma3-270m", [U("x")], ChatOptions(timeout=0.05))
    with pytest.raises(BusyError) as turn:  # same model: waits for the handle
        engine.chat("qwen3-0.6b", [U("y")], ChatOptions(timeout=0.05))
    assert room.value.reason == turn.value.reason == "timeout"
    assert isinstance(room.value, TimeoutError)
    t.join(30)
    assert engine.chat("gemma3-270m", [U("z")], ChatOptions(timeout=5)).message.content == echo("z")


def test_a_swap_is_served_before_later_requests_for_the_loaded_model(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("token_delay_ms", 1)
    manager = make_manager(max_loaded=1)
    order: list[str] = []
    order_lock = threading.Lock()

    def use(name: str, tag: str, delay: float = 0.0) -> None:
        time.sleep(delay)
        with manager.lease(name) as lease:
            with order_lock:
                order.append(tag)
            lease.runtime.generate("count to 300" if tag == "first" else "count to 30")

    first = threading.Thread(target=use, args=("qwen3-0.6b", "first"))
    first.start()
    while not manager.is_loaded("qwen3-0.6b"):
        time.sleep(0.001)
    swap = threading.Thread(target=use, args=("gemma3-270m", "swap", 0.01))
    later = [threading.Thread(target=use, args=("qwen3-0.6b", f"later{i}", 0.03)) for i in range(20)]
    for t in [swap, *later]:
        t.start()
    for t in [first, swap, *later]:
        t.join(60)
    assert order[:2] == ["first", "swap"], order
    assert sorted(order[2:]) == sorted(f"later{i}" for i in range(20))
    no_violations(sim)


def test_nested_requests_fail_at_once_instead_of_hanging(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    manager = make_manager(max_loaded=1)
    engine = ChatEngine(manager, prompt_cache=False)
    other_waiting = threading.Thread(target=lambda: manager.lease("qwen2.5-0.5b", timeout=5).release())
    with closing(engine.stream("qwen3-0.6b", [U("count to 50")])) as events:
        next(events)
        other_waiting.start()  # another request queued for a swap: the nested check must not depend on it
        while manager.waiting() == 0:
            time.sleep(0.001)
        with pytest.raises(BusyError) as other:
            engine.chat("gemma3-270m", [U("nested, other model")])
        with pytest.raises(BusyError) as same:
            engine.chat("qwen3-0.6b", [U("nested, same model")])
        assert other.value.reason == same.value.reason == "deadlock"
        assert "MainThread" in str(other.value) and "already holds" in str(same.value)
        list(events)
    other_waiting.join(10)


async def test_nested_async_request_from_a_stream_fails_at_once(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    manager = make_manager(max_loaded=1)
    engine = ChatEngine(manager, prompt_cache=False)
    async with aclosing(engine.astream("qwen3-0.6b", [U("count to 20")])) as events:
        async for _ in events:
            with pytest.raises(BusyError, match="task"):
                await engine.achat("qwen3-0.6b", [U("nested")])
            with pytest.raises(BusyError, match="already holds"):  # a task started from here is part of the chain
                await asyncio.wait_for(engine.achat("qwen3-0.6b", [U("nested in a child task")]), 5)
            with pytest.raises(BusyError, match="holds qwen3-0.6b and asks for gemma3-270m"):
                await asyncio.gather(engine.achat("gemma3-270m", [U("nested, other model")]))
            break


async def test_a_stream_left_without_aclose_is_not_taken_for_a_nested_request(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("token_delay_ms", 1)
    manager = make_manager(max_loaded=1)
    engine = ChatEngine(manager, prompt_cache=False)
    async for _ in engine.astream("qwen3-0.6b", [U("count to 200")]):
        break  # no aclose: the loop closes the generator a moment later
    assert (await engine.achat("qwen3-0.6b", [U("same model")])).message.content == echo("same model")
    async for _ in engine.astream("qwen3-0.6b", [U("count to 200")]):
        break
    assert (await engine.achat("gemma3-270m", [U("other model")])).message.content == echo("other model")


def test_a_handle_closed_by_its_user_is_dropped_and_reloaded(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    manager = make_manager(max_loaded=1)
    engine = ChatEngine(manager, prompt_cache=False)
    with manager.lease("qwen3-0.6b") as lease:
        lease.runtime.close()
        with pytest.raises(HandleClosedError):
            lease.runtime.generate("x")
    assert engine.chat("qwen3-0.6b", [U("after close")]).message.content == echo("after close")
    assert sim.counter("inits") == 2 and sim.counter("live_handles") >= 1
