"""The batch scheduler and the chat engine's batched path (n_batch > 1) on the simulator, both ABIs."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core.chat.engine import ChatDone, ChatEngine, TextDelta
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.options import ChatOptions
from rkllm_core.errors import BusyError, InvalidParameterError
from rkllm_core.models.line import batch_kv_mb
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.params import InitParams
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.runtime.scheduler import BatchPolicy, scheduler_for
from rkllm_core.sim import SimulatorControl, make_model

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
OTHER = "MyModel-1B-w8a8-rk3588.rkllm"
LOOPS = int(os.environ.get("RKLLM_RACE_LOOPS", "2"))


def U(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def echo(prompt: str) -> str:
    return f"Echo: {prompt} — ok."


@pytest.fixture
def batch_sim(sim: SimulatorControl) -> Iterator[SimulatorControl]:
    sim.set("batch_step_cost", 0.15)
    sim.set("batch_finish", 0)
    yield sim
    assert sim.counter("batch_refusals") == 0, "the binding sent a batched run outside the contract"


@pytest.fixture
def models(model_dir: Path) -> Path:
    make_model(model_dir, QWEN)
    make_model(model_dir, OTHER, think=False)
    return model_dir


@pytest.fixture
def make_engine(
    models: Path, sim_lib: RuntimeLibrary, batch_sim: SimulatorControl
) -> Iterator[Callable[..., ChatEngine]]:
    managers: list[ModelManager] = []

    def factory(n_batch: int | None = 4, gather_s: float = 0.05, **kwargs: object) -> ChatEngine:
        m = ModelManager(ModelRegistry([models], platform=None), library=sim_lib, max_loaded=2, n_batch=n_batch)
        managers.append(m)
        return ChatEngine(m, prompt_cache=False, batch_policy=BatchPolicy(gather_s=gather_s), **kwargs)  # type: ignore[arg-type]

    yield factory
    for m in managers:
        m.close()


def text_of(events: list[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# ----------------------------------------------------------------------------------- the engine ----


def test_concurrent_requests_share_one_run_and_each_gets_its_own_answer(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    engine = make_engine(n_batch=4, gather_s=5.0)  # a long window: the run starts when 4 wait
    prompts = [f"question {i} about {'x' * i}" for i in range(4)]
    results: dict[int, list[object]] = {}

    def ask(i: int) -> None:
        results[i] = list(engine.stream("mymodel-1b", [U(prompts[i])]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert batch_sim.counter("batched_runs") == 1 and batch_sim.counter("runs") == 1
    for i, prompt in enumerate(prompts):
        done = results[i][-1]
        assert isinstance(done, ChatDone)
        assert text_of(results[i]) == done.text and prompt in done.text and done.text.startswith("Echo:")
        assert done.finish_reason == "stop" and not done.kv_reused
        u = done.usage
        assert u.prefilled_tokens == u.input_tokens > 0 and u.cached_tokens == 0
        assert u.output_tokens == -(-len(done.text.encode()) // 4)  # the simulator's 4-byte tokens
    outputs = [r[-1].usage.output_tokens for r in results.values()]  # type: ignore[union-attr]
    assert sum(outputs) == batch_sim.counter("generated_tokens")  # no filler slot: every token was someone's


def test_a_lone_request_is_a_batch_of_one_with_fillers(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    engine = make_engine(n_batch=2, gather_s=0.0)
    done = engine.chat("mymodel-1b", [U("alone here")])
    assert done.text == echo("alone here")
    assert batch_sim.counter("batched_runs") == 1
    with engine.manager.lease("mymodel-1b") as lease:
        assert lease.runtime.params.n_batch == 2


def test_models_without_n_batch_are_untouched(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    engine = make_engine(n_batch=None)
    first = engine.chat("mymodel-1b", [U("one")])
    second = engine.chat("mymodel-1b", [U("one"), first.message, U("two")])
    assert second.kv_reused and batch_sim.counter("batched_runs") == 0


def test_max_new_tokens_and_stop_sequences_are_per_request(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    engine = make_engine(n_batch=4, gather_s=0.05)

    async def main() -> list[ChatDone]:
        return await asyncio.gather(
            engine.achat("mymodel-1b", [U("count to 40")], ChatOptions(max_new_tokens=3)),
            engine.achat("mymodel-1b", [U("count to 40")], ChatOptions(max_new_tokens=3, stop=["3"])),
            engine.achat("mymodel-1b", [U("count to 9")], ChatOptions(max_new_tokens=30)),
        )

    short, stopped, full = asyncio.run(main())
    assert short.finish_reason == "length" and short.usage.output_tokens == 3
    assert stopped.finish_reason == "stop" and "3" not in stopped.text
    assert full.finish_reason == "stop" and full.text == "1 2 3 4 5 6 7 8 9"


def test_a_cancelled_request_leaves_the_others_complete(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    batch_sim.set("token_delay_ms", 2)
    engine = make_engine(n_batch=4, gather_s=5.0)  # the run starts when all 4 wait

    async def main() -> tuple[list[ChatDone], int]:
        started = asyncio.Event()

        async def leaver() -> None:
            async for event in engine.astream("mymodel-1b", [U("count to 300")]):
                if isinstance(event, TextDelta):
                    started.set()

        doomed = asyncio.create_task(leaver())
        keep = [asyncio.create_task(engine.achat("mymodel-1b", [U(f"count to {n}")])) for n in (20, 30, 40)]
        await started.wait()
        doomed.cancel()
        done = await asyncio.gather(*keep)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return done, batch_sim.counter("batched_runs")

    done, runs = asyncio.run(main())
    for d, n in zip(done, (20, 30, 40), strict=True):
        assert d.finish_reason == "stop" and d.text == " ".join(str(i) for i in range(1, n + 1))
    assert runs == 1


def test_a_request_arriving_during_a_run_waits_for_the_next_one(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    batch_sim.set("token_delay_ms", 1)
    engine = make_engine(n_batch=4, gather_s=0.0)
    first = engine.stream("mymodel-1b", [U("count to 50")])
    assert isinstance(next(first), TextDelta)  # the first run is going
    late = engine.chat("mymodel-1b", [U("late one")])
    assert late.text == echo("late one")
    rest = list(first)
    assert isinstance(rest[-1], ChatDone) and rest[-1].finish_reason == "stop"
    assert batch_sim.counter("batched_runs") == 2


def test_a_waiting_request_times_out_with_busy(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    batch_sim.set("token_delay_ms", 1)
    engine = make_engine(n_batch=2, gather_s=0.0)
    first = engine.stream("mymodel-1b", [U("count to 2000")])
    next(first)
    with pytest.raises(BusyError):
        engine.chat("mymodel-1b", [U("impatient")], ChatOptions(timeout=0.05))
    first.close()
    assert engine.chat("mymodel-1b", [U("after")]).text == echo("after")


# ----------------------------------------------------------------------- the scheduler directly ----


def test_fairness_the_oldest_request_is_served_first(
    runtime_factory: Callable[..., RKLLMRuntime], batch_sim: SimulatorControl
) -> None:
    """Two groups interleaved: each run serves the oldest waiting request's group; nobody is overtaken twice."""
    batch_sim.set("token_delay_ms", 1)
    rt = runtime_factory(params=InitParams(n_batch=2))
    sched = scheduler_for(rt, BatchPolicy(gather_s=0.0))
    blocker = sched.submit("count to 200", group="a", prepare=lambda s: None)
    slot = blocker.slot()
    order = ["a", "b", "a", "b", "b", "a"]
    tickets = [sched.submit(f"req {i}", group=g, prepare=lambda s: None) for i, g in enumerate(order)]
    assert "".join(c.text for c in slot).startswith("1 2 3")
    texts = ["".join(c.text for c in t.slot()) for t in tickets]
    assert texts == [echo(f"req {i}") for i in range(len(order))]
    assert sched.stats.max_overtaken <= sched.n_batch - 1 and sched.stats.unfair == 0
    assert sched.stats.runs == 1 + 4  # a+a, b+b, b, a: the head's group, up to n_batch each
    rt.close()


def test_scheduler_refuses_a_single_slot_handle(runtime_factory: Callable[..., RKLLMRuntime]) -> None:
    with pytest.raises(InvalidParameterError):
        scheduler_for(runtime_factory())


def test_memory_estimate_counts_the_extra_kv_caches(models: Path) -> None:
    info = ModelRegistry([models], platform=None).get("qwen3-0.6b")
    one = batch_kv_mb(info, InitParams(max_context_len=4096))
    four = batch_kv_mb(info, InitParams(max_context_len=4096, n_batch=4))
    assert one == 0 and four == 3 * batch_kv_mb(info, InitParams(max_context_len=4096, n_batch=2)) > 0


@pytest.mark.parametrize("loop", range(LOOPS))
def test_race_cancel_while_waiting_never_leaks_a_slot(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl, loop: int
) -> None:
    engine = make_engine(n_batch=4, gather_s=0.001)

    async def main() -> list[ChatDone]:
        tasks = [asyncio.create_task(engine.achat("mymodel-1b", [U(f"p{loop}-{i}")])) for i in range(10)]
        for i, t in enumerate(tasks):
            if i % 3 == 0:
                for _ in range(i % 4):
                    await asyncio.sleep(0)
                t.cancel()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        return [d for d in out if isinstance(d, ChatDone)]

    done = asyncio.run(main())
    for d in done:
        assert d.text.startswith("Echo: p") and d.finish_reason == "stop"
    assert len({d.text for d in done}) == len(done)


def test_rkllm_bench_concurrency_measures_both_configurations(
    models: Path, sim_lib: RuntimeLibrary, batch_sim: SimulatorControl
) -> None:
    from rkllm_core.tools.bench_concurrency import run_concurrency, to_table

    points = run_concurrency(ModelRegistry([models], platform=None), sim_lib, "mymodel-1b", [2], 4, 8)
    assert [p.label for p in points] == ["unbatched", "n_batch=2"]
    assert all(p.tokens == 4 * 8 and p.clients == 4 and p.prefill_tokens > 0 for p in points)
    assert batch_sim.counter("batched_runs") >= 2  # 4 clients in runs of 2 slots (after the warm-up)
    assert "| n_batch=2 | 4 | 32 |" in to_table(points)


def test_doctor_batch_step_compares_each_batched_answer_with_its_single_run(
    models: Path, sim_lib: RuntimeLibrary, batch_sim: SimulatorControl, tmp_path: Path
) -> None:
    from rkllm_core.tools.doctor import BATCH_PROMPTS, _answers_match, run_doctor

    with ModelManager(ModelRegistry([models], platform=None), library=sim_lib, max_loaded=1) as manager:
        results = run_doctor(manager, ["mymodel-1b"], work_dir=tmp_path, batch=True)
    step = next(r for r in results if r.name.startswith("batched run"))
    assert step.status == "PASS", step.detail
    assert batch_sim.counter("batched_runs") == 1
    singles = [echo(p) for p in BATCH_PROMPTS]
    with pytest.raises(AssertionError, match="1 of 3 batched answers differ"):
        _answers_match(singles, [*singles[:2], "something else"])


def test_chatml_conversations_with_different_histories_share_a_run(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    """Earlier turns travel in the prompt (the setup holds only the system block), so the group is the same."""
    engine = make_engine(n_batch=2, gather_s=5.0)
    a = [U("first question"), ChatMessage("assistant", "first answer"), U("follow-up A")]
    b = [U("other question"), ChatMessage("assistant", "other answer"), U("follow-up B")]

    async def main() -> list[ChatDone]:
        return list(await asyncio.gather(engine.achat("qwen3-0.6b", a), engine.achat("qwen3-0.6b", b)))

    done_a, done_b = asyncio.run(main())
    assert batch_sim.counter("batched_runs") == 1
    # the simulator echoes the run's prompt: each holds its own history, then its own new turn
    assert "first answer" in done_a.text and done_a.text.endswith("follow-up A — ok.") and "other" not in done_a.text
    assert "other answer" in done_b.text and done_b.text.endswith("follow-up B — ok.") and "first" not in done_b.text


def test_native_template_conversations_with_different_histories_run_apart(
    make_engine: Callable[..., ChatEngine], batch_sim: SimulatorControl
) -> None:
    """Without a ChatML template the history is part of the handle's setup: different ones cannot share a run."""
    engine = make_engine(n_batch=2, gather_s=0.2)
    a = [U("first question"), ChatMessage("assistant", "first answer"), U("follow-up A")]
    b = [U("other question"), ChatMessage("assistant", "other answer"), U("follow-up B")]

    async def main() -> list[ChatDone]:
        return list(await asyncio.gather(engine.achat("mymodel-1b", a), engine.achat("mymodel-1b", b)))

    done_a, done_b = asyncio.run(main())
    assert (done_a.text, done_b.text) == (echo("follow-up A"), echo("follow-up B"))
    assert batch_sim.counter("batched_runs") == 2


def test_n_batch_from_the_registry_file_and_the_manager_default(model_dir: Path, sim_lib: RuntimeLibrary) -> None:
    from rkllm_core.models.registry_file import load_registry_file

    make_model(model_dir, QWEN)
    make_model(model_dir, OTHER, think=False)
    make_model(model_dir, "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm")
    toml = model_dir / "rkllm-models.toml"
    toml.write_text('[models."qwen3-0.6b"]\nn_batch = 1\n[models."mymodel-1b"]\nn_batch = 3\n', encoding="utf-8")
    assert [e.defaults.n_batch for e in load_registry_file(toml)] == [1, 3]
    registry = ModelRegistry([model_dir], platform=None)
    with ModelManager(registry, library=sim_lib, n_batch=4) as manager:
        assert manager.init_params_for(registry.get("mymodel-1b")).n_batch == 3  # its own setting wins
        assert manager.init_params_for(registry.get("qwen3-0.6b")).n_batch is None  # 1: off for this model
        assert manager.init_params_for(registry.get("qwen3-embedding-0.6b")).n_batch is None  # chat models only
    with ModelManager(registry, library=sim_lib) as manager:
        assert manager.init_params_for(registry.get("qwen3-0.6b")).n_batch is None  # off by default
    toml.write_text('[models."mymodel-1b"]\nn_batch = 0\n', encoding="utf-8")
    with pytest.raises(InvalidParameterError, match="n_batch"):
        load_registry_file(toml)
    with pytest.raises(InvalidParameterError):
        ModelManager(registry, library=sim_lib, n_batch=101)
