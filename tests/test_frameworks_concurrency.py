"""Applications written the way the frameworks' docs show them, under concurrent load.

Two models behind the default budget (one loaded at a time), shared by
LangChain ``abatch``, a FastAPI app with async and sync handlers, and a
LlamaIndex workflow with several workers. Every answer must belong to its own
prompt; the ``sim`` fixture checks native code never saw a destroyed handle or
overlapping runs, and that no handle leaked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.messages import HumanMessage  # noqa: E402
from llama_index.core.workflow import Context, Event, StartEvent, StopEvent, Workflow, step  # noqa: E402

from langchain_rkllm import ChatRKLLM  # noqa: E402
from llamaindex_rkllm import RKLLM  # noqa: E402
from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
GEMMA = "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
MODELS = ("qwen3-0.6b", "gemma3-270m")


def echo(prompt: str) -> str:
    return f"Echo: {prompt} — ok."


async def cancel_once_streaming(sim: SimulatorControl, consumer: Coroutine[Any, Any, None]) -> None:
    """Run ``consumer`` in a task and cancel it once the runtime has streamed a few tokens."""
    task = asyncio.create_task(consumer)
    while sim.counter("callbacks") < 5:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def manager(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ModelManager]:
    sim.set("token_delay_ms", 1)
    make_model(model_dir, QWEN)
    make_model(model_dir, GEMMA, think=False)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:  # max_loaded=1
        yield m
        assert m.waiting() == 0 and all(e.leases == 0 for e in m.loaded())


async def test_langchain_abatch_over_two_models_at_once(manager: ModelManager) -> None:
    qwen, gemma = ChatRKLLM(model=MODELS[0], manager=manager), ChatRKLLM(model=MODELS[1], manager=manager)
    prompts = [[f"qwen batch {i}" for i in range(8)], [f"gemma batch {i}" for i in range(8)]]
    replies = await asyncio.wait_for(asyncio.gather(qwen.abatch(prompts[0]), gemma.abatch(prompts[1])), 60)
    for batch, answers in zip(prompts, replies, strict=True):
        assert [a.content for a in answers] == [echo(p) for p in batch]
    assert {a.response_metadata["model_name"] for a in replies[0]} == {"qwen3-0.6b"}


async def test_langchain_cancel_mid_stream_then_keep_serving(manager: ModelManager, sim: SimulatorControl) -> None:
    chat = ChatRKLLM(model=MODELS[0], manager=manager)

    async def read_forever() -> None:
        async for _ in chat.astream("count to 2000"):
            await asyncio.sleep(0)

    await cancel_once_streaming(sim, read_forever())
    assert (await chat.ainvoke([HumanMessage("still there?")])).content == echo("still there?")
    assert sim.counter("aborts") >= 1


async def test_a_langchain_callback_calling_the_model_again_fails_at_once(manager: ModelManager) -> None:
    """``ainvoke`` runs in a child task (``asyncio.gather``): still part of the streaming chain."""
    from rkllm_core.errors import BusyError

    chat = ChatRKLLM(model=MODELS[0], manager=manager)
    async for _ in chat.astream("count to 50"):
        with pytest.raises(BusyError) as nested:
            await asyncio.wait_for(chat.ainvoke("from a callback"), 10)
        assert nested.value.reason == "deadlock"
        break
    assert (await chat.ainvoke("afterwards")).content == echo("afterwards")


async def test_fastapi_app_with_async_and_sync_handlers(manager: ModelManager) -> None:
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    models = {name: ChatRKLLM(model=name, manager=manager) for name in MODELS}
    app = fastapi.FastAPI()

    @app.get("/chat/{model}")
    async def chat(model: str, q: str) -> dict[str, str]:
        reply = await models[model].ainvoke(q)
        return {"answer": str(reply.content), "model": reply.response_metadata["model_name"]}

    @app.get("/sync-chat/{model}")
    def sync_chat(model: str, q: str) -> dict[str, str]:  # FastAPI runs this in its thread pool
        return {"answer": str(models[model].invoke(q).content)}

    @app.get("/stream/{model}")
    async def stream(model: str, q: str) -> fastapi.responses.StreamingResponse:
        async def body() -> object:
            async for chunk in models[model].astream(q):
                yield chunk.text

        return fastapi.responses.StreamingResponse(body(), media_type="text/plain")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://board") as client:
        kinds = ("chat", "sync-chat", "stream")
        requests = [(kind, MODELS[i % 2], f"{kind} request {i}") for i in range(8) for kind in kinds]

        async def call(kind: str, model: str, q: str) -> str:
            response = await client.get(f"/{kind}/{model}", params={"q": q}, timeout=60)
            assert response.status_code == 200
            return response.text if kind == "stream" else response.json()["answer"]

        answers = await asyncio.wait_for(asyncio.gather(*(call(*r) for r in requests)), 90)
    assert answers == [echo(q) for _, _, q in requests]


class _Question(Event):
    model: str
    text: str


class _Answer(Event):
    text: str
    expected: str


class _TwoModelWorkflow(Workflow):
    """Fans questions out to a step with four workers that asks two models in turn."""

    def __init__(self, llms: dict[str, RKLLM], n: int) -> None:
        super().__init__(timeout=60)
        self.llms, self.n = llms, n

    @step
    async def start(self, ctx: Context, ev: StartEvent) -> _Question | None:
        for i in range(self.n):
            ctx.send_event(_Question(model=MODELS[i % 2], text=f"workflow question {i}"))
        return None

    @step(num_workers=4)
    async def ask(self, ev: _Question) -> _Answer:
        reply = await self.llms[ev.model].acomplete(ev.text)
        return _Answer(text=reply.text, expected=echo(ev.text))

    @step
    async def gather(self, ctx: Context, ev: _Answer) -> StopEvent | None:
        answers = ctx.collect_events(ev, [_Answer] * self.n)
        if answers is None:
            return None
        return StopEvent(result=[(a.text, a.expected) for a in answers])


async def test_llamaindex_workflow_with_four_workers_over_two_models(manager: ModelManager) -> None:
    llms = {name: RKLLM(name, manager=manager) for name in MODELS}
    result = await _TwoModelWorkflow(llms, n=12).run()
    assert len(result) == 12 and all(text == expected for text, expected in result)


async def test_llamaindex_astream_chat_cancelled_in_a_task(manager: ModelManager, sim: SimulatorControl) -> None:
    llm = RKLLM(MODELS[1], manager=manager)

    async def consume() -> None:
        gen = await llm.astream_complete("count to 2000")
        async with aclosing(gen) as responses:  # type: ignore[type-var]
            async for _ in responses:
                await asyncio.sleep(0)

    await cancel_once_streaming(sim, consume())
    assert (await llm.acomplete("next")).text == echo("next")
