"""Batched serving under load: 64 concurrent mixed requests on two n_batch models, both ABIs.

Streams, whole answers, cancelled tasks, streams closed mid-answer (a client that goes
away) and limits, all at once: every finished answer is its own prompt's (the simulator
echoes), nothing crosses slots, the simulator sees no contract violation and no handle
is leaked (the ``sim`` fixture checks both), and the scheduler's fairness bound holds.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_core.chat.engine import ChatDone, ChatEngine, TextDelta
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.options import ChatOptions
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.runtime.scheduler import BatchPolicy, scheduler_for
from rkllm_core.sim import SimulatorControl, make_model

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
OTHER = "MyModel-1B-w8a8-rk3588.rkllm"
MODELS = ("qwen3-0.6b", "mymodel-1b")
N_BATCH = 4
LOOPS = int(os.environ.get("RKLLM_RACE_LOOPS", "1"))


@pytest.fixture
def engine(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ChatEngine]:
    make_model(model_dir, QWEN)
    make_model(model_dir, OTHER, think=False)
    sim.set("batch_step_cost", 0.15)
    sim.set("token_delay_ms", 1)
    manager = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=2, n_batch=N_BATCH)
    yield ChatEngine(manager, prompt_cache=False, batch_policy=BatchPolicy(gather_s=0.005))
    manager.close()
    assert sim.counter("batch_refusals") == 0, "a batched run broke the contract"


def expected(prompt: str) -> str:
    if prompt.startswith("count to "):
        return " ".join(str(i) for i in range(1, int(prompt.split()[-1]) + 1))
    return f"Echo: {prompt} — ok."


async def one(engine: ChatEngine, i: int, rng: random.Random) -> tuple[str, str, ChatDone | None]:
    """Request i: a kind drawn at random; returns (kind, prompt, its ChatDone or None when it left early)."""
    model = MODELS[i % 2]
    kind = rng.choice(["stream", "whole", "cancel", "disconnect", "limit"])
    prompt = f"count to {20 + i}" if kind in ("cancel", "disconnect", "limit") else f"request {i} of the load"
    opts = ChatOptions(max_new_tokens=5) if kind == "limit" else None
    if kind == "whole":
        return kind, prompt, await engine.achat(model, [ChatMessage("user", prompt)], opts)
    if kind == "cancel":
        task = asyncio.ensure_future(engine.achat(model, [ChatMessage("user", prompt)]))
        for _ in range(rng.randrange(6)):
            await asyncio.sleep(0)
        task.cancel()
        try:
            return kind, prompt, await task
        except asyncio.CancelledError:
            return kind, prompt, None
    stream = engine.astream(model, [ChatMessage("user", prompt)], opts)
    text, done = "", None
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                text += event.text
                if kind == "disconnect" and len(text) > 6:
                    break  # the client goes away mid-answer
            elif isinstance(event, ChatDone):
                done = event
                assert done.text == text, "the streamed deltas are the final text"
    finally:
        await stream.aclose()
    return kind, prompt, done


@pytest.mark.parametrize("loop", range(LOOPS))
def test_64_mixed_concurrent_requests_on_two_models(engine: ChatEngine, sim: SimulatorControl, loop: int) -> None:
    rng = random.Random(1000 + loop)

    async def main() -> list[tuple[str, str, ChatDone | None]]:
        return await asyncio.gather(*(one(engine, i, rng) for i in range(64)))

    results = asyncio.run(main())
    finished = 0
    for kind, prompt, done in results:
        if done is None:
            assert kind in ("cancel", "disconnect")
            continue
        finished += 1
        if kind == "limit":
            assert done.finish_reason == "length" and expected(prompt).startswith(done.text)
            assert done.usage.output_tokens == 5
        else:
            assert done.finish_reason == "stop" and done.text == expected(prompt), (kind, prompt, done.text)
        assert done.usage.prefilled_tokens == done.usage.input_tokens > 0
    assert finished >= 30
    assert sim.counter("batched_runs") >= 2
    assert sim.counter("runs") == sim.counter("batched_runs")  # every run of these models was batched
    for name in MODELS:
        with engine.manager.lease(name) as lease:
            sched = scheduler_for(lease.runtime)
            assert sched.waiting == 0
            assert sched.stats.slots_used <= sched.stats.runs * N_BATCH
            assert sched.stats.unfair == 0  # nobody waited behind more than (N - 1) x those before it
