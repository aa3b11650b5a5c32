"""Binding tests: the real ctypes path against the C simulator, for both ABIs.

The ``sim`` fixture asserts after every test that native code never saw an
invalid handle, never had two runs overlap on one handle, never destroyed a
running handle, and that no handle leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rkllm_core.errors import (
    BusyError,
    ContextLengthError,
    HandleClosedError,
    InitError,
    InvalidParameterError,
    ModelFileError,
    NativeError,
    RunError,
)
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.params import InitParams, SamplingParams
from rkllm_core.runtime import ChatTemplate, RKLLMRuntime
from rkllm_core.sim import SimulatorControl, make_model

Factory = Callable[..., RKLLMRuntime]


def echo(prompt: str) -> str:
    """The simulator's plain answer to a prompt."""
    return f"Echo: {prompt} — ok."


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


def test_full_stream(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    chunks = list(runtime.stream("hello there"))
    text = "".join(c.text for c in chunks)
    assert text == echo("hello there")
    final = chunks[-1]
    assert final.finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert final.stats is not None
    assert final.stats.generate_tokens == sim.counter("generated_tokens") > 0
    assert final.stats.prefill_tokens == sim.counter("prefilled_tokens") > 0
    assert all(isinstance(c.token_id, int) for c in chunks[:-1])
    assert sim.counter("runs") == 1


@pytest.mark.parametrize("split", [0, 1], ids=["waiting", "raw-bytes"])
@pytest.mark.parametrize("waiting_text", [0, 1], ids=["null", "empty"])
def test_multibyte_text_survives_any_split(
    runtime: RKLLMRuntime, sim: SimulatorControl, split: int, waiting_text: int
) -> None:
    sim.set("split_utf8_normal", split)
    sim.set("waiting_text", waiting_text)
    prompt = "héllo wörld 日本語 🎉 ok"
    chunks = list(runtime.stream(prompt))
    assert "".join(c.text for c in chunks) == echo(prompt)
    assert all("\ufffd" not in c.text for c in chunks)


def test_generate_returns_whole_text(runtime: RKLLMRuntime) -> None:
    result = runtime.generate("abc")
    assert result.text == echo("abc") and result.finish_reason == "stop" and result.tokens > 0


def test_explicit_abort_mid_stream(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    stream = runtime.stream("count to 5000")
    seen = [next(stream) for _ in range(5)]
    assert "".join(c.text for c in seen).startswith("1 2")
    stream.abort()
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert sim.counter("aborts") == 1
    assert sim.counter("generated_tokens") < 1000
    assert runtime.generate("again").text == echo("again")


@pytest.mark.parametrize("finish_after_abort", [0, 1])
def test_consumer_breaking_early_aborts(runtime: RKLLMRuntime, sim: SimulatorControl, finish_after_abort: int) -> None:
    sim.set("token_delay_ms", 1)
    sim.set("finish_after_abort", finish_after_abort)
    with runtime.stream("count to 5000") as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    # Leaving the with-block waited for the runtime: the run is over right now.
    assert not runtime.is_running
    assert sim.counter("active_runs") == 0
    assert sim.counter("aborts") == 1
    assert runtime.generate("next").text == echo("next")


def test_dropped_stream_aborts(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    stream = runtime.stream("count to 5000")
    next(stream)
    del stream
    gc.collect()
    wait_until(lambda: not runtime.is_running)
    assert sim.counter("aborts") == 1


def test_concurrent_callers_queue_in_order(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 0.2)
    results: dict[int, str] = {}
    order: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            stream = runtime.stream(f"prompt number {i}")
            first = next(stream)
            order.append(i)
            results[i] = first.text + "".join(c.text for c in stream)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    blocker = runtime.stream("count to 300")
    next(blocker)  # hold the handle so every worker has to queue
    threads = []
    for i in range(10):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        wait_until(lambda n=i + 1: runtime._state.lock.waiting() == n)
    list(blocker)
    for t in threads:
        t.join(10)
    assert not errors
    assert results == {i: echo(f"prompt number {i}") for i in range(10)}
    assert order == list(range(10)), "callers must be served first come, first served"
    assert sim.counter("max_active_runs") == 1


def test_busy_timeout(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    with runtime.stream("count to 2000") as holder:
        next(holder)
        t0 = time.monotonic()
        with pytest.raises(BusyError) as info:
            next(runtime.stream("x", timeout=0.05))
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - t0 < 5
        assert runtime._state.lock.waiting() == 0, "a timed-out caller must leave the queue"


def test_runtime_error_mid_stream(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    stream = runtime.stream("please fail [[sim:error]] now")
    with pytest.raises(RunError) as info:
        for _ in stream:
            pass
    assert info.value.function == "rkllm_run"
    assert runtime.generate("still alive").text == echo("still alive")


def test_error_after_tokens_setting(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("error_after_tokens", 3)
    got: list[str] = []
    with pytest.raises(RunError):
        for c in runtime.stream("count to 100"):
            got.append(c.text)
    # The three tokens before the failure are delivered first, however they were batched.
    assert "".join(got) == "1 2 3 4 5 6 "
    assert runtime.generate("ok").text == echo("ok")


async def test_async_error_after_tokens_delivers_the_text_first(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("error_after_tokens", 3)
    got: list[str] = []
    with pytest.raises(RunError):
        async for c in runtime.astream("count to 100"):
            got.append(c.text)
    assert "".join(got) == "1 2 3 4 5 6 "


def test_gc_frees_the_handle(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_path: Path) -> None:
    live = sim.counter("live_handles")
    rt = RKLLMRuntime(model_path, library=sim_lib)
    assert sim.counter("live_handles") == live + 1
    rt.generate("x")
    del rt
    gc.collect()
    assert sim.counter("live_handles") == live
    assert sim.counter("destroys") == 1


def test_gc_while_streaming_waits_for_the_run(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_path: Path) -> None:
    sim.set("token_delay_ms", 1)
    rt = RKLLMRuntime(model_path, library=sim_lib)
    stream = rt.stream("count to 5000")
    next(stream)
    del rt, stream
    gc.collect()
    wait_until(lambda: sim.counter("destroys") == 1)
    assert sim.counter("destroy_while_running") == 0


def test_close_while_streaming(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    chunks: list[str] = []
    reasons: list[str | None] = []
    started = threading.Event()

    def consume() -> None:
        for c in runtime.stream("count to 5000"):
            chunks.append(c.text)
            started.set()
            if c.finish_reason:
                reasons.append(c.finish_reason)

    t = threading.Thread(target=consume)
    t.start()
    started.wait(5)
    runtime.close()
    t.join(5)
    assert reasons == ["abort"]
    assert sim.counter("destroys") == 1
    runtime.close()  # idempotent
    with pytest.raises(HandleClosedError):
        runtime.stream("x")
    with pytest.raises(HandleClosedError):
        runtime.kv_cache_size()


async def test_async_stream_does_not_block_the_loop(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 2)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    text = ""
    final = None
    async for chunk in runtime.astream("count to 40"):
        text += chunk.text
        final = chunk
    stop.set()
    await task
    assert text == " ".join(str(i) for i in range(1, 41))
    assert final is not None and final.finish_reason == "stop"
    assert ticks > 20, "the event loop was blocked while streaming"


async def test_async_cancel_aborts_the_run(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    got = asyncio.Event()

    async def consume() -> None:
        async for _ in runtime.astream("count to 5000"):
            got.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if not runtime.is_running:
            break
        await asyncio.sleep(0.01)
    assert not runtime.is_running
    assert sim.counter("aborts") == 1
    texts = [c.text async for c in runtime.astream("after")]
    assert "".join(texts) == echo("after")


async def test_async_callers_queue(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    async def one(i: int) -> str:
        return "".join([c.text async for c in runtime.astream(f"q{i}")])

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert results == [echo(f"q{i}") for i in range(16)]
    assert sim.counter("max_active_runs") == 1


async def test_async_wait_is_cancellable(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    holder = runtime.astream("count to 2000")
    await holder.__anext__()
    waiter = asyncio.create_task(runtime.astream("queued").__anext__())
    await asyncio.sleep(0.02)
    assert runtime._state.lock.waiting() == 1
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert runtime._state.lock.waiting() == 0
    with pytest.raises(BusyError):
        await runtime.astream("x", timeout=0.01).__anext__()
    await holder.aclose()
    texts = [c.text async for c in runtime.astream("free again")]
    assert "".join(texts) == echo("free again")


def test_max_new_tokens_gives_length(runtime_factory: Factory, sim: SimulatorControl, abi: str) -> None:
    if abi == "1.2":
        rt = runtime_factory(params=InitParams(max_new_tokens=5))
        result = rt.generate("count to 100")
    else:
        rt = runtime_factory()
        result = rt.generate("count to 100", max_new_tokens=5)
    assert result.finish_reason == "length"
    assert result.stats is not None and result.stats.generate_tokens == 5


def test_per_run_sampling_is_1_3_only(runtime: RKLLMRuntime, sim: SimulatorControl, abi: str) -> None:
    sampling = SamplingParams(temperature=0.2, top_k=5)
    if abi == "1.2":
        with pytest.raises(InvalidParameterError, match="1.3"):
            runtime.stream("x", sampling=sampling)
        return
    sim.set("trace", 1)
    runtime.generate("x", sampling=sampling, max_new_tokens=7)
    run = [t for t in sim.trace() if t["fn"] == "rkllm_run"][-1]
    assert run["max_new_tokens"] == 7
    assert run["sampling"]["top_k"] == 5 and abs(run["sampling"]["temperature"] - 0.2) < 1e-6


@pytest.mark.parametrize("delay_ms", [0, 2])
def test_max_new_tokens_per_run_on_both_abis(
    runtime: RKLLMRuntime, sim: SimulatorControl, abi: str, delay_ms: int
) -> None:
    """1.3 takes the limit with the run; on 1.2 the binding counts tokens and aborts the run at the limit."""
    full = runtime.generate("count to 300").text
    sim.set("token_delay_ms", delay_ms)
    sim.reset()
    for limit in (1, 3, 17):
        chunks = list(runtime.stream("count to 300", max_new_tokens=limit))
        assert chunks[-1].finish_reason == "length"
        assert sum(c.n_tokens for c in chunks) == limit
        text = "".join(c.text for c in chunks)
        assert text and full.startswith(text) and len(text.encode()) <= 4 * limit  # the simulator's tokens
    assert runtime.generate("count to 3").finish_reason == "stop"  # no limit: the run ends by itself


def test_a_run_cut_by_the_binding_leaves_the_kv_cache_unclaimed(runtime: RKLLMRuntime, abi: str) -> None:
    """After a cut (1.2) nobody may declare what the cache holds: tokens past the cut may be in it."""
    with runtime.session() as s:
        s.generate("count to 300", max_new_tokens=4, keep_history=True)
        s.mark_kv("conversation-1")
        assert (s.kv.tag is None) == (abi == "1.2")
        s.generate("count to 3", keep_history=True)  # a run that ends by itself can be declared again
        s.mark_kv("conversation-2")
        assert s.kv.tag == "conversation-2"


def test_init_errors_are_typed(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path) -> None:
    with pytest.raises(ModelFileError):
        RKLLMRuntime(model_dir / "missing.rkllm", library=sim_lib)
    corrupt = model_dir / "corrupt-ctx4096.rkllm"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InitError) as info:
        RKLLMRuntime(corrupt, library=sim_lib)
    assert info.value.function == "rkllm_init" and info.value.code != 0
    small = make_model(model_dir, "tiny.rkllm", max_context=1024)  # a limit the file name does not state
    with pytest.raises(InitError, match="max_context_len=4096"):
        RKLLMRuntime(small, params=InitParams(max_context_len=4096), library=sim_lib)
    assert sim.counter("init_failures") == 2
    # The process keeps serving: a good model loads after the failures.
    with RKLLMRuntime(small, library=sim_lib) as rt:
        assert rt.generate("fine").text == echo("fine")


def test_bad_arguments_never_reach_the_runtime(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    with pytest.raises(InvalidParameterError, match="role"):
        runtime.stream("x", role="assistant")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="NUL"):
        runtime.stream("a\0b")
    with pytest.raises(InvalidParameterError):
        runtime.stream(None)
    with pytest.raises(InvalidParameterError):
        runtime.stream(123)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidParameterError):
        SamplingParams(temperature=float("nan"))
    assert sim.counter("runs") == 0


def test_keep_history_and_kv_cache(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    assert runtime.kv_cache_size() == 0
    runtime.generate("first turn", keep_history=True)
    after_one = runtime.kv_cache_size()
    assert after_one > 0
    prefilled = sim.counter("prefilled_tokens")
    runtime.generate("second", keep_history=True)
    assert runtime.kv_cache_size() > after_one
    # The second turn prefilled only its own message (no system prompt again).
    assert sim.counter("prefilled_tokens") - prefilled < prefilled
    runtime.clear_kv_cache()
    assert runtime.kv_cache_size() == 0
    runtime.generate("independent")
    assert runtime.kv_cache_size() == 0


def test_function_tools_and_tool_role(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "magic_function",
                "description": "Applies a magic function to an input.",
                "parameters": {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]},
            },
        }
    ]
    runtime.set_function_tools("You are a helpful assistant.", tools)
    text = runtime.generate("What is magic_function(3)? Use the tool.").text
    assert "<tool_call>" in text and '"name": "magic_function"' in text and '"input": 3' in text
    answer = runtime.generate('[{"output": 5}]', role="tool").text
    assert answer == 'Tool result: [{"output": 5}]'
    with pytest.raises(InvalidParameterError, match="JSON"):
        runtime.set_function_tools("s", [{"bad": object()}])
    with pytest.raises(InvalidParameterError):
        runtime.set_function_tools("s", "{not json")


def test_chat_template(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("trace", 1)
    runtime.set_chat_template("SYS", "<u>", "</u><a>")
    assert runtime.generate("hi").text == echo("hi")
    calls = [t for t in sim.trace() if t["fn"] == "rkllm_set_chat_template"]
    assert calls[-1]["system_prompt"] == "SYS" and calls[-1]["prompt_prefix"] == "<u>"
    with pytest.raises(InvalidParameterError):
        runtime.set_chat_template("a\0", "", "")


def test_prompt_cache_save_and_load(runtime_factory: Factory, sim: SimulatorControl, tmp_path: Path) -> None:
    cache = tmp_path / "system.cache"
    system = "You are a meticulous assistant. " * 30
    a = runtime_factory()
    a.set_chat_template(system, "<u>", "</u>")
    a.generate("hi", save_prompt_cache=cache)
    assert cache.is_file() and sim.counter("prompt_cache_saves") == 1
    a.close()
    b = runtime_factory()
    b.set_chat_template(system, "<u>", "</u>")
    b.load_prompt_cache(cache)
    before = sim.counter("prefilled_tokens")
    b.generate("hello")
    assert sim.counter("prompt_cache_hit_tokens") > 100
    assert sim.counter("prefilled_tokens") - before < 20
    b.release_prompt_cache()
    assert sim.counter("prompt_cache_releases") == 1
    with pytest.raises(InvalidParameterError):
        b.load_prompt_cache(tmp_path / "missing.cache")
    corrupt = tmp_path / "corrupt.cache"
    corrupt.write_text("garbage")
    with pytest.raises(NativeError) as info:
        b.load_prompt_cache(corrupt)
    assert info.value.function == "rkllm_load_prompt_cache"
    assert b.generate("ok").text == echo("ok")


def test_lora(runtime: RKLLMRuntime, sim: SimulatorControl, tmp_path: Path) -> None:
    adapter = tmp_path / "style.rkllm_lora"
    adapter.write_bytes(b"lora")
    runtime.load_lora(adapter, "style")
    assert runtime.generate("hey", lora="style").text == "[lora:style] " + echo("hey")
    with pytest.raises(RunError):
        runtime.generate("hey", lora="unknown")
    with pytest.raises(InvalidParameterError):
        runtime.load_lora(tmp_path / "nope", "x")


def test_thinking_switch(runtime: RKLLMRuntime) -> None:
    with_thinking = runtime.generate("why", enable_thinking=True).text
    assert with_thinking.startswith("<think>") and with_thinking.endswith(echo("why"))
    assert runtime.generate("why").text == echo("why")


def test_two_handles_run_in_parallel(runtime_factory: Factory, sim: SimulatorControl, model_dir: Path) -> None:
    sim.set("token_delay_ms", 1)
    a = runtime_factory()
    b = runtime_factory(make_model(model_dir, "gemma-3-1b-it_w8a8.rkllm"))
    out: dict[str, str] = {}

    def go(name: str, rt: RKLLMRuntime) -> None:
        out[name] = rt.generate("count to 60").text

    threads = [threading.Thread(target=go, args=(n, r)) for n, r in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    expected = " ".join(str(i) for i in range(1, 61))
    assert out == {"a": expected, "b": expected}
    assert sim.counter("max_active_runs") == 2


# -- sessions, the KV cache's state, close -------------------------------------------------------------------


def test_a_session_is_exclusive_and_the_kv_state_lives_on_the_handle(runtime: RKLLMRuntime) -> None:
    with runtime.session() as s:
        start = s.kv.epoch
        s.generate("turn one", keep_history=True)
        assert s.kv.epoch == start + 1 and s.kv.tag is None  # a run moves the epoch; nobody declared the content
        s.mark_kv("conversation A", s.kv_cache_size())
        assert runtime.kv.tag == "conversation A" and runtime.kv.tokens and runtime.kv.tokens > 0
        others: list[str] = []
        t = threading.Thread(target=lambda: others.append(runtime.generate("someone else").text))
        t.start()
        time.sleep(0.05)
        assert others == [] and runtime._state.lock.waiting() == 1  # waits for the session
    t.join(5)
    assert others == [echo("someone else")]
    assert runtime.kv.tag is None and runtime.kv.epoch == start + 2  # the other run reset what we declared
    with runtime.session() as s:
        s.mark_kv("B")
        s.set_chat_template("sys", "<u>", "</u>")
        assert s.kv.tag is None and s.chat_setup == ChatTemplate("sys", "<u>", "</u>")
        s.mark_kv("C")
        s.clear_kv_cache()
        assert s.kv.tag is None and s.kv.tokens == 0


def test_asking_again_for_a_handle_you_hold_fails_at_once(runtime: RKLLMRuntime) -> None:
    with runtime.session():
        with pytest.raises(BusyError, match="already holds") as err:
            runtime.generate("nested")
        assert err.value.reason == "deadlock"
    # A one-shot stream lets go by itself when its run ends: waiting behind it is fine.
    stream = runtime.stream("count to 20")
    next(stream)
    assert runtime.generate("after").text == echo("after")
    stream.close()


def test_session_calls_are_checked(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 2)
    s = runtime.session()
    with pytest.raises(InvalidParameterError, match="not active"):
        s.kv_cache_size()
    with s:
        stream = s.stream("count to 20")
        next(stream)
        with pytest.raises(BusyError, match="still going"):
            s.clear_kv_cache()
        stream.close()
        s.clear_kv_cache()
    with pytest.raises(InvalidParameterError, match="only once"):
        s.acquire()


def test_invalid_text_never_reaches_the_runtime(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    runs = sim.counter("runs")
    with pytest.raises(InvalidParameterError, match=r"prompt is not valid text: .* at position 3"):
        runtime.stream("abc\ud800def")
    with pytest.raises(InvalidParameterError, match="system_prompt"):
        runtime.set_chat_template("bad \udfff", "", "")
    with pytest.raises(InvalidParameterError, match="NUL character at position 1"):
        runtime.stream("a\0b")
    assert sim.counter("runs") == runs and sim.counter("template_sets") == 0


def test_close_waits_for_another_holder_but_never_for_itself(runtime_factory: Factory, sim: SimulatorControl) -> None:
    rt = runtime_factory()
    with rt.session() as s:
        rt.close()  # held by this thread: returns at once, destroyed when the session lets go
        assert rt.closed and sim.counter("destroys") == 0
        with pytest.raises(HandleClosedError):
            s.kv_cache_size()
    assert sim.counter("destroys") == 1
    rt2 = runtime_factory()
    held, go = threading.Event(), threading.Event()

    def hold() -> None:
        with rt2.session():
            held.set()
            go.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    threading.Timer(0.05, go.set).start()
    rt2.close(timeout=5)  # waits for the other thread to let go
    assert sim.counter("destroys") == 2
    t.join(5)


def test_the_gc_safety_net_never_blocks(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_path: Path) -> None:
    sim.set("token_delay_ms", 2)
    rt = RKLLMRuntime(model_path, library=sim_lib)
    state = rt._state
    backend = state.backend
    state.backend = _IgnoresAbort(backend)  # a runtime that does not honour rkllm_abort (yet)
    stream = rt.stream("count to 5000")
    next(stream)
    del rt, stream  # dropped mid-run: the stream asks for an abort, the finalizer runs
    gc.collect()
    assert state.closed and not state.destroyed and state.current is not None  # it did not wait for the run
    state.backend = backend
    assert state.abort_current()
    wait_until(lambda: state.destroyed)  # destroyed by the worker once rkllm_run returned
    assert sim.counter("destroys") == 1 and sim.counter("destroy_while_running") == 0


class _IgnoresAbort:
    def __init__(self, backend: object) -> None:
        self._backend = backend

    def abort(self, handle: int) -> int:
        return 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)


async def test_an_async_session_lets_go_only_after_its_native_call(
    runtime: RKLLMRuntime, sim: SimulatorControl
) -> None:
    sim.set("destroy_delay_ms", 0)
    started, release = threading.Event(), threading.Event()

    def slow_native() -> None:
        started.set()
        release.wait(5)

    async def request() -> None:
        async with runtime.session() as s:
            await s.call(slow_native)

    task = asyncio.create_task(request())
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runtime._state.lock.locked()  # the call is still running: the handle is not handed on yet
    release.set()
    texts = [c.text async for c in runtime.astream("next", timeout=5)]
    assert "".join(texts) == echo("next")


async def test_a_destroy_never_runs_on_the_event_loop(runtime_factory: Factory, sim: SimulatorControl) -> None:
    rt = runtime_factory()
    state = rt._state
    destroyed_on: list[str] = []
    state.backend = _RecordsDestroy(state.backend, destroyed_on)
    async with rt.session():
        rt.close()  # held by this task: destroyed when it lets go, which happens on the loop
        assert not state.destroyed
    await asyncio.to_thread(wait_until, lambda: state.destroyed)
    assert len(destroyed_on) == 1 and destroyed_on[0].startswith("rkllm-native")
    assert sim.counter("destroys") == 1


class _RecordsDestroy:
    def __init__(self, backend: object, threads: list[str]) -> None:
        self._backend, self._threads = backend, threads

    def destroy(self, handle: int) -> int:
        self._threads.append(threading.current_thread().name)
        return self._backend.destroy(handle)  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)


def test_the_file_names_context_limit_applies_without_the_manager(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path
) -> None:
    small = make_model(model_dir, "tiny-llm-w8a8-ctx256.rkllm")
    with RKLLMRuntime(small, library=sim_lib) as rt:  # no InitParams: the file's own limit, not the default
        assert rt.max_context_len == 256
        assert rt.generate("hi").text == echo("hi")
    inits = sim.counter("inits") + sim.counter("init_failures")
    with pytest.raises(ContextLengthError, match="above the 256-token limit") as err:
        RKLLMRuntime(small, params=InitParams(max_context_len=512), library=sim_lib)
    assert err.value.requested == 512 and err.value.limit == 256
    assert sim.counter("inits") + sim.counter("init_failures") == inits  # refused before rkllm_init


EXIT_CHILD = r"""
import atexit, json, sys, threading, time
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.sim import SimulatorControl
lib, model = sys.argv[1:3]
sim = SimulatorControl(lib)
sim.set("token_delay_ms", 5)  # "count to 3000": about 15 s of generation
atexit.register(lambda: print("counters", json.dumps(sim.counters()), flush=True))  # runs last
rt = RKLLMRuntime(model, library=lib)

def stream():
    result = rt.generate("count to 3000")
    print("finish", result.finish_reason, result.tokens, flush=True)

threading.Thread(target=stream).start()  # not a daemon: Python joins it at exit
while sim.counter("generated_tokens") < 5:
    time.sleep(0.005)
print("main returns", flush=True)
"""


def test_exit_aborts_a_thread_still_streaming(sim_paths: dict[str, Path], model_path: Path, abi: str) -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", EXIT_CHILD, str(sim_paths[abi]), str(model_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    lines = proc.stdout.splitlines()
    finish = next(line for line in lines if line.startswith("finish")).split()
    assert lines.index("main returns") < lines.index(" ".join(finish))
    assert finish[1] == "abort" and int(finish[2]) < 1000, proc.stdout  # stopped, not run to its end
    counters = json.loads(next(line for line in lines if line.startswith("counters"))[len("counters ") :])
    assert counters["destroys"] == 1 and counters["destroy_while_running"] == 0
    assert counters["invalid_handle_calls"] == 0 and counters["live_handles"] == 0


class _RecordsRuns:
    """A backend whose rkllm_run notes the thread it is called on (and may hold the run until released)."""

    def __init__(self, backend: object) -> None:
        self._backend = backend
        self.threads: list[threading.Thread] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def run(self, handle: int, inp: object, infer: object, userdata: int) -> int:
        self.threads.append(threading.current_thread())
        self.entered.set()
        self.hold.wait(5)
        return self._backend.run(handle, inp, infer, userdata)  # type: ignore[attr-defined,no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)


def test_one_worker_thread_makes_every_run_of_a_handle(runtime_factory: Factory, sim: SimulatorControl) -> None:
    rt = runtime_factory()
    recorder = _RecordsRuns(rt._state.backend)
    rt._state.backend = recorder  # type: ignore[assignment]
    assert rt.generate("one").text == echo("one")
    with rt.session() as s:
        s.generate("two")
        s.infer("three", mode="hidden")
    asyncio.run(_drain(rt.astream("four")))
    assert len(recorder.threads) == 4 and len(set(recorder.threads)) == 1  # sync, session, tensor and async runs
    worker = recorder.threads[0]
    assert worker is not threading.current_thread() and worker.daemon and worker.is_alive()
    rt.close()
    worker.join(5)
    assert not worker.is_alive()  # the worker ends with its handle
    assert sim.counter("runs") == 4


async def _drain(chunks: object) -> None:
    async for _chunk in chunks:  # type: ignore[attr-defined]
        pass


def test_each_handle_has_its_own_worker(runtime_factory: Factory, sim: SimulatorControl) -> None:
    a, b = runtime_factory(), runtime_factory()
    rec_a, rec_b = _RecordsRuns(a._state.backend), _RecordsRuns(b._state.backend)
    a._state.backend, b._state.backend = rec_a, rec_b  # type: ignore[assignment]
    a.generate("x")
    b.generate("y")
    assert rec_a.threads[0] is not rec_b.threads[0]


def test_no_worker_is_started_before_the_first_run(runtime: RKLLMRuntime) -> None:
    # This handle's own worker, not the process's threads: other tests' workers may still be ending.
    worker = runtime._state.worker
    assert worker._thread is None
    runtime.kv_cache_size()  # native calls other than runs need no worker
    assert worker._thread is None
    runtime.generate("x")
    assert worker._thread is not None and worker._thread.is_alive()


def test_a_run_aborted_before_the_worker_takes_it_never_starts(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    from rkllm_core.native.backend import RunRequest
    from rkllm_core.runtime.run import Run, RunState

    state = runtime._state
    recorder = _RecordsRuns(state.backend)
    state.backend = recorder  # type: ignore[assignment]
    recorder.hold.clear()
    first = runtime.stream("count to 50")
    next(first)  # the worker is now inside the first rkllm_run, held there
    second = Run(0, ())
    req = RunRequest(b"user", b"hi", None, False, False, None, None, None, None)
    inp, infer, _keep = recorder.run_structs(req)
    state.worker.submit(state, second, inp, infer)  # queued behind the first run
    second.aborted = True
    assert second.state is RunState.QUEUED
    recorder.hold.set()
    first.close()
    assert second.wait_returned(5)
    assert len(recorder.threads) == 1 and sim.counter("runs") == 1  # rkllm_run never called for the second
    assert second.channel is not None
    chunks = second.feed_many(second.channel.get_many())
    assert chunks[-1].finish_reason == "abort" and second.state is RunState.ENDED


def test_a_stopped_worker_refuses_runs(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    from rkllm_core.runtime.run import Run, RunWorker

    worker = RunWorker("test")
    assert worker.stop(timeout=1)  # never started: nothing to wait for
    with pytest.raises(HandleClosedError):
        worker.submit(runtime._state, Run(0, ()), None, None)
    assert sim.counter("runs") == 0


def test_life_cycles_of_sessions_streams_and_runs(runtime: RKLLMRuntime, sim: SimulatorControl) -> None:
    from rkllm_core.runtime.handle import SessionState
    from rkllm_core.runtime.run import RunState, StreamState

    sim.set("token_delay_ms", 20)  # the first chunk comes long before the run's end
    session = runtime.session()
    assert session.state is SessionState.NEW and not session.active
    with session:
        assert session.state is SessionState.ACTIVE and session.active
        stream = session.stream("count to 50")
        assert stream.state is StreamState.NEW and stream.run is None
        next(stream)
        run = stream.run
        assert stream.state is StreamState.STREAMING and run is not None and not run.ended
        rest = list(stream)
        assert rest[-1].finish_reason == "stop"
        assert stream.state is StreamState.DONE and run.state is RunState.ENDED and run.returned
    assert session.state is SessionState.CLOSED and not session.active
    with pytest.raises(InvalidParameterError, match="only once"):
        session.acquire()
    unused = runtime.stream("never started")
    unused.close()
    assert unused.state is StreamState.DONE and unused.run is None
    assert list(unused) == []


def test_a_worker_that_cannot_start_fails_the_run_and_starts_at_the_next(
    runtime: RKLLMRuntime, sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start"):
            runtime.generate("first")
    assert runtime._state.current is None and not runtime._state.lock.locked()
    second: list[str] = []  # no run may be left waiting for a thread that never started
    waiter = threading.Thread(target=lambda: second.append(runtime.generate("second").text), daemon=True)
    waiter.start()
    waiter.join(10)
    assert second == [echo("second")] and sim.counter("runs") == 1


def test_a_cut_run_that_ended_before_its_abort_counts_only_what_was_delivered() -> None:
    """At board speed the abort lands first; on a fast runtime the run may end by itself after the cut."""
    from types import SimpleNamespace

    from rkllm_core.native.callback import END, FINISH, LIMIT, NORMAL
    from rkllm_core.runtime.run import Run

    run = Run(3, ())
    perf = SimpleNamespace(
        prefill_time_ms=5.0, prefill_tokens=42, generate_time_ms=9.0, generate_tokens=20, memory_usage_mb=1.0
    )
    items = [(NORMAL, b"1 2 ", 1), (NORMAL, b"3 4 ", 2), (NORMAL, b"5 6 ", 3), (LIMIT,), (FINISH, perf), (END, 0, None)]
    chunks = run.feed_many(items)
    final = chunks[-1]
    assert final.finish_reason == "length" and "".join(c.text for c in chunks) == "1 2 3 4 5 6 "
    assert final.stats is not None and final.stats.generate_tokens == 3 and final.stats.prefill_tokens == 42
