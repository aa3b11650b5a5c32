"""ChatRKLLM against the simulator, for both ABIs: streaming shapes, reasoning, tools, structured output,
queueing, cancellation, KV-cache reuse across turns, and concurrency over two models.

Every test runs with the ``sim`` fixture, which also asserts that native code never saw a
destroyed handle, an overlapping run or a destroy-while-running, and that no handle leaked.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_rkllm import ChatRKLLM, UnsupportedContentError
from rkllm_core.errors import ModelKindError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"  # qwen3-0.6b: thinking model
QWEN25 = "Qwen_Qwen2.5-0.5B-Instruct-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"  # qwen2.5-0.5b


def echo(prompt: str) -> str:
    return f"Echo: {prompt} — ok."


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


class JokeDict(TypedDict):
    """Joke to tell user."""

    setup: str
    punchline: str


@tool
def get_weather(location: str) -> str:
    """Get the current weather at a location."""
    return f"It is sunny in {location}."


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


@pytest.fixture
def make_manager(
    model_dir: Path,
    sim_lib: RuntimeLibrary,
    sim: SimulatorControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., ModelManager]]:
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "prompt-cache"))
    make_model(model_dir, QWEN)
    make_model(model_dir, QWEN25, think=False)
    managers: list[ModelManager] = []

    def factory(max_loaded: int = 1) -> ModelManager:
        m = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=max_loaded)
        managers.append(m)
        return m

    yield factory
    for m in managers:
        m.close()


@pytest.fixture
def manager(make_manager: Callable[..., ModelManager]) -> ModelManager:
    return make_manager()


@pytest.fixture
def chat(manager: ModelManager) -> ChatRKLLM:
    return ChatRKLLM(model="qwen3-0.6b", manager=manager)


def aggregate(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    return full


# -- invoke and stream ------------------------------------------------------------------------------------------


def test_invoke_and_metadata(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    msg = chat.invoke([SystemMessage("Be brief."), HumanMessage("hello there")])
    assert isinstance(msg, AIMessage) and msg.content == echo("hello there")
    meta = msg.response_metadata
    assert meta["model_name"] == "qwen3-0.6b" and meta["finish_reason"] == "stop" and meta["model_provider"] == "rkllm"
    assert meta["prefilled_tokens"] == sim.counter("prefilled_tokens") and meta["kv_reused"] is False
    assert meta["stats"]["generate_tokens"] == sim.counter("generated_tokens")
    usage = msg.usage_metadata
    assert usage is not None and usage["output_tokens"] == sim.counter("generated_tokens") > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens"] >= meta["prefilled_tokens"] > 0
    assert "reasoning_content" not in msg.additional_kwargs and msg.tool_calls == []


def test_stream_chunk_shapes(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)  # at zero delay the binding merges tokens that arrive faster than it reads
    chunks = list(chat.stream("count to 30"))
    assert len(chunks) >= 3 and all(isinstance(c, AIMessageChunk) for c in chunks)
    *body, last = chunks
    assert last.chunk_position == "last" and last.content == ""
    assert last.usage_metadata is not None and last.usage_metadata["output_tokens"] > 0
    assert last.response_metadata["finish_reason"] == "stop"
    assert all(c.usage_metadata is None and c.chunk_position is None for c in body)  # usage only on the last chunk
    assert all(c.content for c in body)
    full = aggregate(chunks)
    assert full.content == " ".join(str(i) for i in range(1, 31)) == chat.invoke("count to 30").content
    assert full.usage_metadata == last.usage_metadata


async def test_astream_and_ainvoke(chat: ChatRKLLM) -> None:
    chunks = [c async for c in chat.astream("count to 12")]
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata is not None
    assert aggregate(chunks).content == " ".join(str(i) for i in range(1, 13))
    assert (await chat.ainvoke("hi")).content == echo("hi")


async def test_async_calls_never_block_the_event_loop(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    await chat.ainvoke("warm up")  # the first call loads the model (in a worker thread)
    sim.set("token_delay_ms", 5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    reply = await chat.ainvoke("count to 60")
    task.cancel()
    assert reply.content == " ".join(str(i) for i in range(1, 61))
    assert ticks >= 20  # about 300 ms of generation: the loop kept running


def test_callbacks_see_every_token(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 2)  # at zero delay the binding merges tokens that arrive faster than it reads

    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    handler = Tokens()
    msg = chat.invoke("count to 20", config={"callbacks": [handler]})
    assert "".join(handler.tokens) == msg.content and len(handler.tokens) > 2


def test_stop_sequences_and_max_tokens(manager: ModelManager) -> None:
    chat = ChatRKLLM(model="qwen3-0.6b", manager=manager, stop=[" 6"])
    assert chat.invoke("count to 10").content == "1 2 3 4 5"
    assert chat.invoke("count to 10", stop=[" 3"]).content == "1 2"  # a per-call stop replaces the instance's
    short = ChatRKLLM(model="qwen3-0.6b", manager=manager, max_tokens=3).invoke("count to 50")
    assert short.response_metadata["finish_reason"] == "length"
    assert short.usage_metadata is not None and short.usage_metadata["output_tokens"] == 3


def test_chain_with_prompt_template(chat: ChatRKLLM) -> None:
    chain = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")]) | chat
    assert (chain | StrOutputParser()).invoke({"question": "What is an NPU?"}) == echo("What is an NPU?")


def test_model_override_per_call(chat: ChatRKLLM) -> None:
    msg = chat.invoke("hello", model="qwen2.5-0.5b")
    assert msg.response_metadata["model_name"] == "qwen2.5-0.5b" and msg.content == echo("hello")
    assert chat.invoke("hello").response_metadata["model_name"] == "qwen3-0.6b"


def test_names_and_consecutive_messages(chat: ChatRKLLM) -> None:
    msg = chat.invoke([HumanMessage("first", name="alice"), HumanMessage("second", name="bob")])
    assert msg.content == echo("alice: first\nbob: second")


def test_unsupported_modality_never_reaches_the_runtime(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    audio = {"type": "audio", "base64": "UklGRg==", "mime_type": "audio/wav"}
    with pytest.raises(UnsupportedContentError, match="audio"):
        chat.invoke([HumanMessage([{"type": "text", "text": "What is this?"}, audio])])
    image = {"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"}
    with pytest.raises(ModelKindError, match="image"):  # a text model: refused before it loads
        chat.invoke([HumanMessage([{"type": "text", "text": "What is this?"}, image])])
    assert sim.counter("runs") == 0 and sim.counter("inits") == 0


# -- reasoning --------------------------------------------------------------------------------------------------


def test_reasoning_is_separated(manager: ModelManager) -> None:
    thinking = ChatRKLLM(model="qwen3-0.6b", manager=manager, reasoning=True)
    msg = thinking.invoke("why is the sky blue")
    assert msg.content == echo("why is the sky blue")
    assert msg.additional_kwargs["reasoning_content"].startswith("The user wrote")
    assert "<think>" not in msg.content and "</think>" not in msg.content
    assert msg.content_blocks[0]["type"] == "reasoning"

    chunks = list(thinking.stream("why is the sky blue"))
    reasoning = [c for c in chunks if c.additional_kwargs.get("reasoning_content")]
    assert reasoning and all(c.content == "" for c in reasoning)
    first_text = next(i for i, c in enumerate(chunks) if c.content)
    assert max(chunks.index(c) for c in reasoning) < first_text  # reasoning streams first
    full = aggregate(chunks)
    assert full.content == msg.content
    assert full.additional_kwargs["reasoning_content"] == msg.additional_kwargs["reasoning_content"]

    off = ChatRKLLM(model="qwen3-0.6b", manager=manager).invoke("why is the sky blue")
    assert "reasoning_content" not in off.additional_kwargs
    per_call = ChatRKLLM(model="qwen3-0.6b", manager=manager).invoke("why", reasoning=True)
    assert "reasoning_content" in per_call.additional_kwargs


# -- tools ------------------------------------------------------------------------------------------------------


def test_tool_call_invoke_stream_and_round_trip(chat: ChatRKLLM) -> None:
    llm = chat.bind_tools([get_weather, magic_function])
    question = HumanMessage("What is magic_function(3)?")
    call = llm.invoke([question])
    assert call.content == ""
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("magic_function", {"input": 3})]
    assert call.tool_calls[0]["id"]

    chunks = list(llm.stream([question]))
    pieces = [tc for c in chunks for tc in c.tool_call_chunks]
    assert pieces and pieces[0]["name"] == "magic_function" and pieces[0]["id"] and pieces[0]["index"] == 0
    assert all(p["name"] is None and p["id"] is None for p in pieces[1:])
    assert "".join(p["args"] or "" for p in pieces) == '{"input": 3}'
    full = aggregate(chunks)
    assert full.tool_calls[0]["name"] == "magic_function" and full.tool_calls[0]["args"] == {"input": 3}

    result = magic_function.invoke(call.tool_calls[0])
    assert isinstance(result, ToolMessage)
    answer = llm.invoke([question, call, result])
    assert answer.content == "Tool result: 5" and answer.tool_calls == []


def test_tool_choice_forces_a_call(chat: ChatRKLLM) -> None:
    forced = chat.bind_tools([get_weather, magic_function], tool_choice="magic_function").invoke("Hello!")
    assert [c["name"] for c in forced.tool_calls] == ["magic_function"]
    anyone = chat.bind_tools([get_weather, magic_function], tool_choice="any").invoke("Hello!")
    assert len(anyone.tool_calls) == 1
    none = chat.bind_tools([get_weather, magic_function], tool_choice="none").invoke("Use magic_function(2)")
    assert none.tool_calls == [] and none.content == echo("Use magic_function(2)")


def test_simulated_model_picks_a_tool_by_topic_and_quoted_argument(chat: ChatRKLLM) -> None:
    llm = chat.bind_tools([get_weather])
    call = llm.invoke("What's the weather like in 'Paris' today?")
    assert call.tool_calls[0]["name"] == "get_weather" and call.tool_calls[0]["args"] == {"location": "Paris"}
    result = get_weather.invoke(call.tool_calls[0])
    answer = llm.invoke([HumanMessage("What's the weather like in 'Paris' today?"), call, result])
    assert answer.content == "Tool result: It is sunny in Paris." and not answer.tool_calls


def test_langgraph_react_agent(chat: ChatRKLLM) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # create_react_agent is deprecated in favour of langchain's create_agent
        create_react_agent = pytest.importorskip("langgraph.prebuilt").create_react_agent

        agent = create_react_agent(chat, [get_weather])
    out = agent.invoke({"messages": [("human", "What is the weather in 'Lyon'?")]})
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert out["messages"][-1].content == "Tool result: It is sunny in Lyon."


# -- structured output ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_structured_output(chat: ChatRKLLM, method: str) -> None:
    joke = chat.with_structured_output(Joke, method=method).invoke("Tell me a joke about 'cats'")  # type: ignore[arg-type]
    assert joke == Joke(setup="cats", punchline="cats")
    as_dict = chat.with_structured_output(JokeDict, method=method).invoke("Tell me a joke")  # type: ignore[arg-type]
    assert set(as_dict) == {"setup", "punchline"}
    streamed = list(chat.with_structured_output(Joke, method=method).stream("Tell me a joke"))  # type: ignore[arg-type]
    assert streamed and all(isinstance(j, Joke) for j in streamed)
    raw = chat.with_structured_output(Joke, method=method, include_raw=True).invoke("Tell me a joke")  # type: ignore[arg-type]
    assert isinstance(raw["raw"], AIMessage) and isinstance(raw["parsed"], Joke) and raw["parsing_error"] is None


def test_structured_output_include_raw_reports_parse_errors(chat: ChatRKLLM) -> None:
    # json_mode without a schema: the simulator echoes, which is not JSON
    out = chat.with_structured_output(None, method="json_mode", include_raw=True).invoke("no json here")
    assert out["parsed"] is None and out["parsing_error"] is not None
    assert "Respond with a JSON object only" in out["raw"].content


# -- queueing, cancellation -------------------------------------------------------------------------------------


def test_batch_queues_on_one_model(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    prompts = [f"question {i}" for i in range(8)]
    results = chat.batch(prompts, config={"max_concurrency": 8})
    assert [r.content for r in results] == [echo(p) for p in prompts]
    assert sim.counter("max_active_runs") == 1  # one generation at a time on the handle


async def test_abatch_queues_on_one_model(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    prompts = [f"async question {i}" for i in range(8)]
    results = await chat.abatch(prompts)
    assert [r.content for r in results] == [echo(p) for p in prompts]
    assert sim.counter("max_active_runs") == 1


def test_breaking_out_of_a_stream_aborts(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 5)
    for i, _ in enumerate(chat.stream("count to 500")):
        if i == 2:
            break
    assert sim.counter("aborts") == 1
    assert chat.invoke("after").content == echo("after")


async def test_async_cancel_aborts_on_the_npu(chat: ChatRKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 10)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in chat.astream("count to 1000"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if sim.counter("aborts") == 1 and sim.counter("active_runs") == 0:
            break
        await asyncio.sleep(0.01)
    assert sim.counter("aborts") == 1 and sim.counter("active_runs") == 0
    assert sim.counter("generated_tokens") < 500

    sim.set("token_delay_ms", 10)
    task = asyncio.create_task(chat.ainvoke("count to 1000"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sim.set("token_delay_ms", 0)
    assert (await chat.ainvoke("still serving")).content == echo("still serving")
    assert sim.counter("aborts") == 2


# -- KV-cache reuse ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reasoning", [False, True], ids=["plain", "reasoning"])
def test_multi_turn_reuses_the_kv_cache(chat: ChatRKLLM, sim: SimulatorControl, reasoning: bool) -> None:
    history: list[BaseMessage] = [SystemMessage("You are a helpful assistant that answers in one sentence.")]
    prefilled: list[int] = []
    for turn in range(6):
        history.append(HumanMessage(f"Question number {turn}: what is {turn} plus {turn}?"))
        sim.reset()
        reply = chat.invoke(history, reasoning=reasoning)
        assert reply.content == echo(history[-1].content)  # type: ignore[operator]
        meta, usage = reply.response_metadata, reply.usage_metadata
        assert usage is not None
        assert meta["prefilled_tokens"] == sim.counter("prefilled_tokens")
        assert meta["kv_reused"] == (turn > 0)
        if turn > 0:
            assert usage["input_token_details"]["cache_read"] == usage["input_tokens"] - meta["prefilled_tokens"] > 0
            assert meta["prefilled_tokens"] < usage["input_tokens"] / 2
        prefilled.append(meta["prefilled_tokens"])
        history.append(reply)  # sent back unchanged: the next turn continues the cached conversation
    assert max(prefilled[1:]) < prefilled[0]

    # Another instance on the same manager continues the conversation the KV cache holds.
    other = ChatRKLLM(model="qwen3-0.6b", manager=chat.manager)
    history.append(HumanMessage("One more question?"))
    assert other.invoke(history, reasoning=reasoning).response_metadata["kv_reused"] is True


def test_streamed_reply_sent_back_reuses_the_kv_cache(chat: ChatRKLLM) -> None:
    history: list[BaseMessage] = [HumanMessage("hello")]
    reply = aggregate(list(chat.stream(history)))
    history += [reply, HumanMessage("and again")]
    assert chat.invoke(history).response_metadata["kv_reused"] is True


# -- concurrency over two models --------------------------------------------------------------------------------


@pytest.mark.slow
def test_many_async_and_threaded_calls_on_two_models(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    sim.set("token_delay_ms", 1)
    live_before = sim.counter("live_handles")
    manager = make_manager(max_loaded=2)
    models = [ChatRKLLM(model="qwen3-0.6b", manager=manager), ChatRKLLM(model="qwen2.5-0.5b", manager=manager)]
    errors: list[BaseException] = []
    answers: dict[str, str] = {}
    lock = threading.Lock()

    def threaded(i: int) -> None:
        prompt = f"thread {i} asks"
        try:
            content = models[i % 2].invoke(prompt).content
            with lock:
                answers[prompt] = str(content)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    async def main() -> list[tuple[str, str]]:
        async def one(i: int) -> tuple[str, str]:
            prompt = f"task {i} asks"
            return prompt, str((await models[i % 2].ainvoke(prompt)).content)

        return await asyncio.gather(*(one(i) for i in range(32)))

    threads = [threading.Thread(target=threaded, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    results = asyncio.run(asyncio.wait_for(main(), 120))
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "deadlock: threads still running"
    assert not errors, errors
    assert all(answer == echo(prompt) for prompt, answer in results)
    assert len(answers) == 32 and all(answer == echo(prompt) for prompt, answer in answers.items())
    assert sim.counter("runs") == 64 and sim.counter("inits") == 2  # both models stayed loaded
    assert sim.counter("concurrent_run_violations") == 0
    manager.close()
    assert sim.counter("live_handles") == live_before
