"""Batched runs (n_batch > 1): the simulator's contract, the binding's arrays, and RKLLMRuntime.batch()."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from rkllm_core.errors import InvalidParameterError, RunError
from rkllm_core.native import abi12, abi13
from rkllm_core.native.callback import _RESULT_SIZE
from rkllm_core.native.structs import RKLLMResult
from rkllm_core.params import InitParams, StreamChunk
from rkllm_core.runtime import FILLER_PROMPT, BatchInput, RKLLMRuntime
from rkllm_core.runtime.batch import SlotState
from rkllm_core.sim import SimulatorControl

DATA = Path(__file__).resolve().parent / "data"
MODULES = {"1.2": abi12, "1.3": abi13}
PROMPTS = ["hello there", "count to 12", "héllo wörld ünïcode ✓✓ naïve", "Ångström 東京 😀 end"]


def echo(prompt: str) -> str:
    """What the simulated model answers (see the simulator's reply rules)."""
    if prompt.startswith("count to "):
        return " ".join(str(i) for i in range(1, int(prompt.split()[-1]) + 1))
    return f"Echo: {prompt} — ok."


@pytest.fixture
def batch_sim(sim: SimulatorControl) -> Iterator[SimulatorControl]:
    """The simulator with the batch settings at their defaults; checks that no batched run was refused."""
    sim.set("batch_step_cost", 0.15)
    sim.set("batch_finish", 0)
    yield sim
    assert sim.counter("batch_refusals") == 0, "the binding sent a batched run outside the contract"
    sim.set("batch_finish", 0)


@pytest.fixture
def batched(runtime_factory: Callable[..., RKLLMRuntime], batch_sim: SimulatorControl) -> Callable[[int], RKLLMRuntime]:
    def make(n: int) -> RKLLMRuntime:
        return runtime_factory(params=InitParams(n_batch=n))

    return make


# -------------------------------------------------------------------------------------- layouts ----


@pytest.mark.parametrize(("version", "abi"), [("1.2.3", "1.2"), ("1.3.0", "1.3")])
def test_batch_array_strides_are_the_header_sizes(version: str, abi: str) -> None:
    facts = json.loads((DATA / f"layout-{version}-lp64.json").read_text())
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        pytest.skip("the layout facts checked here are LP64")
    inputs = (MODULES[abi].RKLLMInput * 3)()
    stride = ctypes.addressof(inputs[1]) - ctypes.addressof(inputs[0])
    assert stride == facts["RKLLMInput"]["size"] == (64 if abi == "1.2" else 160)
    assert _RESULT_SIZE == ctypes.sizeof(RKLLMResult) == facts["RKLLMResult"]["size"] == 72


# ------------------------------------------------------------------------ runtime-level batches ----


def test_every_slot_answers_its_own_prompt(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    rt = batched(4)
    with rt.batch(PROMPTS) as run:
        texts = ["".join(c.text for c in slot) for slot in run.slots]
        assert run.wait(30)
    assert texts == [echo(p) for p in PROMPTS]
    for slot, prompt in zip(run.slots, PROMPTS, strict=True):
        assert slot.finish_reason == "stop"
        assert slot.state is SlotState.DONE
        assert slot.tokens == -(-len(echo(prompt).encode()) // 4)  # 4-byte tokens, each counted once
    assert batch_sim.counter("batched_runs") == 1 and batch_sim.counter("runs") == 1
    assert batch_sim.counter("generated_tokens") == sum(s.tokens for s in run.slots)
    assert run.stats is not None and run.stats.generate_tokens == run.slots[0].tokens


@pytest.mark.parametrize("mode", ["waiting_null", "waiting_empty", "split_bytes"])
def test_utf8_split_across_callbacks_never_crosses_slots(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl, mode: str
) -> None:
    batch_sim.set("waiting_text", 1 if mode == "waiting_empty" else 0)
    batch_sim.set("split_utf8_normal", 1 if mode == "split_bytes" else 0)
    prompts = ["😀😀😀 ab", "東京 x 東京", "é" * 9, "ok"]
    rt = batched(4)
    with rt.batch(prompts) as run:
        texts = [slot_text(slot) for slot in run.slots]
    assert texts == [echo(p) for p in prompts]


def slot_text(slot: Iterable[StreamChunk]) -> str:
    return "".join(c.text for c in slot)


@pytest.mark.parametrize("shape", [0, 1, 2])
def test_every_finish_shape_gives_the_same_answers(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl, shape: int
) -> None:
    """0: an array of results; 1: one result with poison after it (read as an array, it would show); 2: none."""
    batch_sim.set("batch_finish", shape)
    prompts = ["short", "a somewhat longer prompt than the others", "mid length"]
    rt = batched(3)
    with rt.batch(prompts) as run:
        texts = [slot_text(s) for s in run.slots]
        assert run.wait(30)
    assert texts == [echo(p) for p in prompts]
    assert all(s.finish_reason == "stop" for s in run.slots)
    assert (run.stats is None) == (shape == 2)
    if shape == 1:  # the run's totals, read from the one result there is
        assert run.stats is not None and run.stats.generate_tokens == sum(s.tokens for s in run.slots)


def test_max_new_tokens_ends_each_slot_with_length(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    rt = batched(3)
    with rt.batch(["count to 50", "hi", "count to 40"], max_new_tokens=4) as run:
        texts = [slot_text(s) for s in run.slots]
        assert run.wait(30)
    assert [s.tokens for s in run.slots] == [4, 4, 4]
    assert [s.finish_reason for s in run.slots] == ["length", "length", "length"]
    assert texts[1] == echo("hi")[:16]
    assert texts[0] == echo("count to 50")[:16]


def test_fewer_prompts_than_slots_use_the_filler(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    batch_sim.set("trace", 1)
    rt = batched(4)
    with rt.batch(["count to 30"], filler="filler text") as run:
        assert len(run.slots) == 1 and run.fillers == 3 and run.n_batch == 4
        assert slot_text(run.slots[0]) == echo("count to 30")
        assert run.wait(30)
    runs = [t for t in batch_sim.trace() if t["fn"] == "rkllm_run"]
    assert [t["slot"] for t in runs] == [0, 1, 2, 3]
    assert [t["prompt"] for t in runs] == ["count to 30", "filler text", "filler text", "filler text"]
    assert all(t["keep_history"] == 0 for t in runs)


def test_a_filler_that_outlives_the_real_slots_is_aborted(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    batch_sim.set("token_delay_ms", 1)
    rt = batched(2)
    with rt.batch(["hi"], filler="count to 100000") as run:
        assert slot_text(run.slots[0]) == echo("hi")
        assert run.slots[0].finish_reason == "stop"
        assert run.wait(30)
    assert batch_sim.counter("aborts") == 1
    assert batch_sim.counter("generated_tokens") < 1000


def test_default_filler_is_short(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    rt = batched(2)
    with rt.batch(["count to 20"]) as run:
        assert slot_text(run.slots[0]) == echo("count to 20")
        assert run.wait(30)
    assert len(echo(FILLER_PROMPT).encode()) < len(echo("count to 20").encode())
    assert batch_sim.counter("aborts") == 0  # the filler ended first: nothing to stop


def test_a_detached_slot_leaves_the_others_complete(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    batch_sim.set("token_delay_ms", 1)
    rt = batched(3)
    prompts = ["count to 3000", "count to 40", "hello"]
    with rt.batch(prompts) as run:
        first = next(run.slots[0])
        run.slots[0].detach()
        assert run.slots[0].state is SlotState.DETACHED
        assert list(run.slots[0]) == []
        assert slot_text(run.slots[1]) == echo(prompts[1])
        assert slot_text(run.slots[2]) == echo(prompts[2])
        assert run.wait(30)
    assert first.text and first.finish_reason is None
    assert batch_sim.counter("aborts") == 1  # nobody wanted slot 0's long answer any more
    assert batch_sim.counter("generated_tokens") < 1000  # slot 0 alone would make over 3000


def test_abort_ends_every_slot_with_abort(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    batch_sim.set("token_delay_ms", 1)
    rt = batched(2)
    with rt.batch(["count to 5000", "count to 4000"]) as run:
        next(run.slots[0])
        assert run.abort()
        reasons = [[c.finish_reason for c in s][-1] for s in run.slots]
    assert reasons == ["abort", "abort"]


def test_an_error_in_the_run_fails_the_unfinished_slots(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    rt = batched(2)
    with rt.batch(["count to 30", "[[sim:error]] please"]) as run:
        for slot in run.slots:
            with pytest.raises(RunError):
                list(slot)
    assert batch_sim.counter("errors") == 1


def test_batched_run_forgets_the_kv_cache(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    rt = batched(2)
    before = rt.kv.epoch
    with rt.batch(["one", "two"]) as run:
        [slot_text(s) for s in run.slots]
        assert run.wait(30)
    assert rt.kv.epoch > before and rt.kv.tag is None and rt.kv.tokens is None
    with rt.session() as s:
        s.mark_kv("claimed")
        assert s.kv.tag is None  # nobody may claim what a batched run left in the cache
        assert s.kv_cache_size() == 0


def test_single_runs_are_refused_on_a_batched_handle(batched: Callable[[int], RKLLMRuntime]) -> None:
    rt = batched(2)
    with pytest.raises(InvalidParameterError, match="n_batch=2"):
        rt.generate("hello")


@pytest.mark.parametrize(
    ("prompts", "kwargs"),
    [([], {}), (["a", "b", "c"], {}), ("abc", {}), (["a"], {"filler": ""}), ([BatchInput(role="user")], {})],
)
def test_bad_batches_are_refused_before_the_runtime(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl, prompts: object, kwargs: dict[str, str]
) -> None:
    rt = batched(2)
    with pytest.raises(InvalidParameterError):
        rt.batch(prompts, **kwargs)  # type: ignore[arg-type]
    assert batch_sim.counter("runs") == 0


def test_batch_inputs_carry_role_and_token_ids(
    batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    rt = batched(3)
    inputs = [BatchInput("[1,2]", role="tool"), BatchInput(token_ids=[5, 6, 7]), "plain"]
    with rt.batch(inputs) as run:
        texts = [slot_text(s) for s in run.slots]
    assert texts == ["Tool result: [1,2]", "Echo: <3 tokens> — ok.", echo("plain")]


def test_n1_batch_and_single_runs_on_an_n1_handle(runtime: RKLLMRuntime, batch_sim: SimulatorControl) -> None:
    assert runtime.generate("hello").text == echo("hello")
    with runtime.batch(["count to 9"]) as run:
        assert slot_text(run.slots[0]) == echo("count to 9")
        assert run.wait(30)
    assert runtime.generate("again").text == echo("again")
    assert batch_sim.counter("batched_runs") == 0  # n_batch=1 is the single-run contract


def test_async_slots_and_cancelling_one(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    batch_sim.set("token_delay_ms", 1)
    rt = batched(3)

    async def main() -> tuple[list[str], bool]:
        run = await rt.abatch(["count to 5000", "count to 25", "héllo 東京"])

        async def read(i: int) -> str:
            return "".join([c.text async for c in run.slots[i]])

        slow = asyncio.create_task(read(0))
        texts = await asyncio.gather(read(1), read(2))
        slow.cancel()
        cancelled = False
        try:
            await slow
        except asyncio.CancelledError:
            cancelled = True
        await asyncio.to_thread(run.wait, 30)
        return list(texts), cancelled

    texts, cancelled = asyncio.run(main())
    assert texts == [echo("count to 25"), echo("héllo 東京")]
    assert cancelled
    assert batch_sim.counter("generated_tokens") < 2000


def test_slots_read_from_several_threads(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    prompts = [f"count to {n}" for n in (33, 7, 21, 14)]
    rt = batched(4)
    results: dict[int, str] = {}
    with rt.batch(prompts) as run:
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, slot_text(run.slots[i]))) for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [results[i] for i in range(4)] == [echo(p) for p in prompts]


def test_races_detach_abort_close_and_gc(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    batch_sim.set("token_delay_ms", 0.2)
    rt = batched(3)
    for i in range(20):
        run = rt.batch(["count to 400", f"tell {i}", "count to 60"])
        if i % 4 == 0:
            run.slots[i % 3].detach()
            assert slot_text(run.slots[(i + 1) % 3]) == echo(["count to 400", f"tell {i}", "count to 60"][(i + 1) % 3])
            run.close()
        elif i % 4 == 1:
            next(run.slots[0])
            run.abort()
            run.close()
        elif i % 4 == 2:
            del run  # dropped unread: the slots detach and the run is aborted
            gc.collect()
        else:
            assert slot_text(run.slots[1]) == echo(f"tell {i}")
            run.close(timeout=30)
        assert rt.generate is not None
    with rt.batch(["last one", "and"]) as run:  # the handle is free and healthy afterwards
        assert slot_text(run.slots[0]) == echo("last one")
    rt.close()
    assert rt.destroyed


def test_closing_the_runtime_aborts_a_batched_run(
    runtime_factory: Callable[..., RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    batch_sim.set("token_delay_ms", 1)
    rt = runtime_factory(params=InitParams(n_batch=2))
    run = rt.batch(["count to 100000", "count to 90000"])
    next(run.slots[1])
    rt.close()  # the run is aborted; the handle goes once the runtime has returned
    assert run.wait(30)
    reasons = [[c.finish_reason for c in s][-1] for s in run.slots]
    assert reasons == ["abort", "abort"]
    assert rt.destroyed


def test_async_races_with_cancels(batched: Callable[[int], RKLLMRuntime], batch_sim: SimulatorControl) -> None:
    batch_sim.set("token_delay_ms", 0.2)
    rt = batched(3)
    cancelled: list[int] = []

    async def one(i: int) -> None:
        prompts = ["count to 300", f"round {i} ✓", "count to 50"]
        run = await rt.abatch(prompts)

        async def read(k: int) -> str:
            return "".join([c.text async for c in run.slots[k]])

        tasks = [asyncio.create_task(read(k)) for k in range(3)]
        victim = tasks[i % 3]
        await asyncio.sleep(0)  # every reader starts (a task cancelled before it runs never reads its slot)
        if i % 2:
            await asyncio.sleep(0.002)  # sometimes before the first chunk, sometimes after
        victim.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for k, result in enumerate(results):
            if tasks[k] is victim and isinstance(result, asyncio.CancelledError):
                assert run.slots[k].state is SlotState.DETACHED
                cancelled.append(i)
            else:
                assert result == echo(prompts[k])
        await asyncio.to_thread(run.wait, 30)

    async def main() -> None:
        for i in range(20):
            await one(i)

    asyncio.run(main())
    assert batch_sim.counter("batched_runs") == 20
    assert cancelled  # the loop did exercise cancels mid-run
