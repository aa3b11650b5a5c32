"""RKLLM, the LlamaIndex LLM, against the simulator.

Every method sync and async, metadata, usage for TokenCountingHandler, thinking, tool
calling (chat_with_tools, predict_and_call, FunctionAgent), structured_predict, KV-cache
reuse across turns, and aborts on cancel/close. Claims about prefill are measured with
the simulator's counters.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import (  # noqa: E402
    ChatMessage,
    CompletionResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import BaseModel, ValidationError  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events import BaseEvent  # noqa: E402
from llama_index.core.llms.llm import ToolSelection  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from llamaindex_rkllm import RKLLM  # noqa: E402
from llamaindex_rkllm.base import FALLBACK_CONTEXT_WINDOW, to_core_messages  # noqa: E402
from rkllm_core.chat.messages import ToolCallRequest  # noqa: E402
from rkllm_core.errors import InvalidParameterError  # noqa: E402
from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native import library as core_library  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
BIG = "Qwen_Qwen2.5-1.5B-Instruct-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm"


def echo(prompt: str) -> str:
    return f"Echo: {prompt} — ok."


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"It is sunny and 21 C in {city}."


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


WEATHER = FunctionTool.from_defaults(get_weather)
ADD = FunctionTool.from_defaults(add)


@pytest.fixture
def abi() -> str:
    """ABI 1.3 unless a test parametrizes ``abi`` itself."""
    return "1.3"


@pytest.fixture
def models(model_dir: Path) -> Path:
    make_model(model_dir, QWEN)
    make_model(model_dir, BIG, think=False)
    return model_dir


@pytest.fixture
def manager(
    models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModelManager]:
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "prompt-cache"))
    m = ModelManager(ModelRegistry([models], platform=None), library=sim_lib)
    yield m
    m.close()


@pytest.fixture
def llm(manager: ModelManager) -> RKLLM:
    return RKLLM("qwen3-0.6b", manager=manager)


def usage_of(raw: dict) -> dict:
    u = raw["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    return u


# ----------------------------------------------------------------------------- construction


def test_constructing_and_metadata_load_nothing(sim_paths: dict[str, Path], models: Path, tmp_path: Path) -> None:
    # A private copy of the simulator: nothing else in this process has loaded it.
    lib_copy = tmp_path / "librkllmrt-copy.so"
    shutil.copy(sim_paths["1.3"], lib_copy)
    key = str(lib_copy.resolve())
    loaded = lambda: any(str(p) == key or str(Path(p).resolve()) == key for p, _ in core_library._loaded)  # noqa: E731
    llm = RKLLM("qwen3-0.6b", model_dir=models, library_path=lib_copy, temperature=0.5)
    assert llm.model_dir == str(models) and llm.library_path == str(lib_copy)
    assert llm.metadata.context_window == 4096  # from the file name, read without the library
    assert not loaded(), "constructing RKLLM or reading its metadata loaded the runtime library"
    try:
        assert llm.complete("hello").text == echo("hello")
        assert loaded()
        ctl = SimulatorControl(lib_copy)
        assert ctl.counter("inits") == 1 and ctl.counter("runs") == 1
    finally:
        llm.manager.close()


def test_instances_on_one_manager_continue_each_others_conversations(manager: ModelManager) -> None:
    a, b = RKLLM("qwen3-0.6b", manager=manager), RKLLM("qwen3-0.6b", manager=manager, temperature=0.2)
    assert a.manager is manager and b.manager is manager
    history = [user("Hello there.")]
    first = a.chat(history)
    history += [first.message, user("And then?")]
    second = b.chat(history)  # the KV cache holds a's conversation: b continues it
    assert second.raw["kv_reused"] and second.message.content == echo("And then?")
    third = a.chat([user("A new conversation.")])  # not the one in the cache: rebuilt
    assert not third.raw["kv_reused"]


def test_metadata(manager: ModelManager, models: Path, caplog: pytest.LogCaptureFixture) -> None:
    md = RKLLM("qwen3-0.6b", manager=manager).metadata
    assert md.context_window == 4096 and md.num_output == 256
    assert md.is_chat_model and md.is_function_calling_model and md.model_name == "qwen3-0.6b"
    assert RKLLM("qwen2.5-1.5b", manager=manager).metadata.context_window == 16384
    assert RKLLM("qwen2.5-1.5b", manager=manager, context_window=8000).metadata.context_window == 8000
    assert RKLLM("qwen3-0.6b", manager=manager, max_new_tokens=64).metadata.num_output == 64
    with caplog.at_level("WARNING"):
        assert RKLLM("qwen3-0.6b", manager=manager, context_window=100_000).metadata.context_window == 4096
    assert "larger than the 4096-token context" in caplog.text
    # Unknown model: the override, else a fixed fallback, with one warning.
    caplog.clear()
    with caplog.at_level("WARNING"):
        ghost = RKLLM("no-such-model", manager=manager)
        assert ghost.metadata.context_window == FALLBACK_CONTEXT_WINDOW == 4096
        assert ghost.metadata.context_window == 4096
    assert caplog.text.count("cannot read the context size") == 1
    assert RKLLM("no-such-model", manager=manager, context_window=2048).metadata.context_window == 2048


def test_registry_context_setting_is_reported(models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> None:
    (models / "rkllm-models.toml").write_text('[models."qwen3-0.6b"]\nmax_context_len = 2048\n')
    with ModelManager(ModelRegistry([models], platform=None), library=sim_lib) as m:
        assert RKLLM("qwen3-0.6b", manager=m).metadata.context_window == 2048


def test_settings_are_validated_at_construction() -> None:
    for bad in ({"top_p": 2.0}, {"temperature": -1}, {"max_new_tokens": 0}, {"stop": [""]}, {"top_k": 1.5}):
        with pytest.raises(ValidationError):
            RKLLM("qwen3-0.6b", **bad)
    assert RKLLM("qwen3-0.6b", stop="###").stop == ["###"]
    with pytest.raises(TypeError):
        RKLLM("qwen3-0.6b", manager="not a manager")  # type: ignore[arg-type]
    fields = RKLLM.model_fields
    for name in (
        "model",
        "temperature",
        "max_new_tokens",
        "top_p",
        "top_k",
        "repeat_penalty",
        "frequency_penalty",
        "presence_penalty",
        "stop",
        "thinking",
        "timeout",
        "context_window",
        "model_dir",
        "library_path",
    ):
        assert fields[name].description, f"{name} has no description"


# ----------------------------------------------------------------------------- the eight methods


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_complete_and_chat(llm: RKLLM, sim: SimulatorControl) -> None:
    r = llm.complete("hello")
    assert r.text == echo("hello")
    u = usage_of(r.raw)
    assert r.raw["finish_reason"] == "stop" and r.raw["model"] == "qwen3-0.6b"
    assert u["completion_tokens"] == sim.counter("generated_tokens") > 0
    assert u["prefilled_tokens"] == sim.counter("prefilled_tokens") > 0
    assert r.additional_kwargs["prompt_tokens"] == u["prompt_tokens"]

    c = llm.chat([ChatMessage(role="system", content="Be brief."), user("hi there")])
    assert c.message.role == MessageRole.ASSISTANT and c.message.content == echo("hi there")
    assert c.message.blocks == [TextBlock(text=echo("hi there"))]
    assert c.raw["finish_reason"] == "stop" and usage_of(c.raw)["completion_tokens"] > 0


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_stream_complete_and_stream_chat(llm: RKLLM, sim: SimulatorControl) -> None:
    chunks = list(llm.stream_complete("count to 40"))
    expected = " ".join(str(i) for i in range(1, 41))
    assert "".join(c.delta or "" for c in chunks) == expected == chunks[-1].text
    running = ""
    for c in chunks:
        running += c.delta or ""
        assert c.text == running  # every chunk carries the text so far
    assert chunks[-1].delta == "" and usage_of(chunks[-1].raw)["completion_tokens"] == sim.counter("generated_tokens")

    sim.reset()
    chat_chunks = list(llm.stream_chat([user("count to 30")]))
    assert "".join(c.delta or "" for c in chat_chunks) == " ".join(str(i) for i in range(1, 31))
    assert chat_chunks[-1].message.content == " ".join(str(i) for i in range(1, 31))
    assert all(c.message.role == MessageRole.ASSISTANT for c in chat_chunks)
    assert chat_chunks[-1].raw["finish_reason"] == "stop"
    assert usage_of(chat_chunks[-1].raw)["completion_tokens"] == sim.counter("generated_tokens")


async def test_async_methods(llm: RKLLM, sim: SimulatorControl) -> None:
    r = await llm.acomplete("hello")
    assert r.text == echo("hello") and usage_of(r.raw)["completion_tokens"] > 0
    c = await llm.achat([user("hi")])
    assert c.message.content == echo("hi")

    gen = await llm.astream_complete("count to 25")
    chunks = [c async for c in gen]
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].text == " ".join(str(i) for i in range(1, 26))
    assert chunks[-1].raw["finish_reason"] == "stop"

    gen2 = await llm.astream_chat([user("count to 12")])
    chat_chunks = [c async for c in gen2]
    assert chat_chunks[-1].message.content == " ".join(str(i) for i in range(1, 13))
    assert usage_of(chat_chunks[-1].raw)["completion_tokens"] > 0


async def test_async_calls_do_not_block_the_event_loop(llm: RKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        r = await llm.acomplete("count to 40")  # ~200 ms of simulated decoding
    finally:
        task.cancel()
    assert r.text.endswith("40")
    assert ticks >= 10, f"the event loop was blocked (only {ticks} ticks)"


def test_per_call_options(llm: RKLLM, sim: SimulatorControl) -> None:
    r = llm.complete("count to 100", max_new_tokens=5)
    assert r.raw["finish_reason"] == "length" and usage_of(r.raw)["completion_tokens"] == 5
    r = llm.complete("count to 100", max_tokens=3)  # OpenAI spelling
    assert usage_of(r.raw)["completion_tokens"] == 3
    r = llm.complete("count to 20", stop=["7 8"])
    assert r.text == "1 2 3 4 5 6 " and r.raw["finish_reason"] == "stop"
    assert RKLLM("qwen3-0.6b", manager=llm.manager, stop=["3"]).complete("count to 9").text == "1 2 "
    with pytest.raises(InvalidParameterError):
        llm.complete("hi", top_p=5.0)  # bad per-call values never reach the runtime
    r = llm.complete("hi", temperature=0.3, top_k=5, some_unknown_option=1)  # unknown keywords are ignored
    assert r.text == echo("hi")


@pytest.mark.parametrize("abi", ["1.2"])
def test_sampling_fixed_at_init_on_abi_12_loads_an_instance_per_setting(llm: RKLLM, sim: SimulatorControl) -> None:
    llm.complete("a")
    llm.complete("b", temperature=0.2)
    assert sim.counter("inits") == 2  # max_loaded=1: the first instance was swapped out
    llm.complete("c", temperature=0.2)
    assert sim.counter("inits") == 2


def test_system_prompt_applies_to_complete(manager: ModelManager, sim: SimulatorControl) -> None:
    sim.set("trace", 1)
    llm = RKLLM("qwen3-0.6b", manager=manager, system_prompt="You are terse and precise.")
    assert llm.complete("hello").text == echo("hello")
    slot = [t for t in sim.trace() if t["fn"] == "rkllm_set_chat_template"][-1]["system_prompt"]
    assert "You are terse and precise." in slot
    llm.complete("hello again", formatted=True)  # an already formatted prompt gets no system prompt
    slot = [t for t in sim.trace() if t["fn"] == "rkllm_set_chat_template"][-1]["system_prompt"]
    assert "terse" not in slot


def test_token_counting_handler_reads_the_runtime_usage(llm: RKLLM, sim: SimulatorControl) -> None:
    counter = TokenCountingHandler()
    llm.callback_manager = CallbackManager([counter])
    r = llm.chat([user("hello")])
    u = usage_of(r.raw)
    assert counter.prompt_llm_token_count == u["prompt_tokens"]
    assert counter.completion_llm_token_count == u["completion_tokens"] == sim.counter("generated_tokens")
    counter.reset_counts()
    chunks = list(llm.stream_complete("count to 10"))
    u = usage_of(chunks[-1].raw)
    assert counter.prompt_llm_token_count == u["prompt_tokens"]
    assert counter.completion_llm_token_count == u["completion_tokens"]


# ----------------------------------------------------------------------------- completions are chat


async def _completion(llm: RKLLM, method: str, prompt: str, **kwargs: Any) -> CompletionResponse:
    """The final response of one of the four completion methods."""
    if method == "complete":
        return llm.complete(prompt, **kwargs)
    if method == "acomplete":
        return await llm.acomplete(prompt, **kwargs)
    if method == "stream_complete":
        return list(llm.stream_complete(prompt, **kwargs))[-1]
    return [c async for c in await llm.astream_complete(prompt, **kwargs)][-1]


COMPLETION_METHODS = ["complete", "acomplete", "stream_complete", "astream_complete"]


@pytest.mark.parametrize("method", COMPLETION_METHODS)
async def test_every_completion_sends_the_system_prompt_unless_formatted(
    manager: ModelManager, sim: SimulatorControl, method: str
) -> None:
    sim.set("trace", 1)
    llm = RKLLM("qwen3-0.6b", manager=manager, system_prompt="You are terse and precise.")

    def system_slot() -> str:
        return [t for t in sim.trace() if t["fn"] == "rkllm_set_chat_template"][-1]["system_prompt"]

    assert (await _completion(llm, method, "hello")).text == echo("hello")
    assert "You are terse and precise." in system_slot()
    assert (await _completion(llm, method, "hello again", formatted=True)).text == echo("hello again")
    assert "terse" not in system_slot()


@pytest.mark.parametrize("method", COMPLETION_METHODS)
async def test_a_completion_is_reported_as_one_completion_event(llm: RKLLM, method: str) -> None:
    seen: list[str] = []

    class Recorder(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if type(event).__name__.startswith("LLM") and not type(event).__name__.endswith("InProgressEvent"):
                seen.append(type(event).__name__)

    counter = TokenCountingHandler()
    llm.callback_manager = CallbackManager([counter])
    root = get_dispatcher()
    recorder = Recorder()
    root.add_event_handler(recorder)
    try:
        r = await _completion(llm, method, "hello")
    finally:
        root.event_handlers.remove(recorder)
    assert seen == ["LLMCompletionStartEvent", "LLMCompletionEndEvent"]  # no chat events nested inside
    assert len(counter.llm_token_counts) == 1
    assert counter.completion_llm_token_count == usage_of(r.raw)["completion_tokens"] > 0


@pytest.mark.parametrize("method", COMPLETION_METHODS)
async def test_a_completion_carries_what_the_chat_answer_carries(manager: ModelManager, method: str) -> None:
    thinker = RKLLM("qwen3-0.6b", manager=manager, thinking=True)
    chat = thinker.chat([user("so?")])
    r = await _completion(thinker, method, "so?")
    assert r.text == chat.message.content == echo("so?")
    assert r.additional_kwargs["reasoning_content"] == chat.additional_kwargs["reasoning_content"]
    assert r.additional_kwargs["reasoning_content"].startswith("The user wrote")
    assert r.additional_kwargs["completion_tokens"] == usage_of(r.raw)["completion_tokens"] > 0
    assert r.raw["finish_reason"] == "stop"

    plain = RKLLM("qwen3-0.6b", manager=manager)
    r = await _completion(plain, method, "Please call get_weather('Paris').", tools=[WEATHER])
    (call,) = r.additional_kwargs["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert "reasoning_content" not in r.additional_kwargs


def test_streamed_completion_chunks_carry_the_text_and_the_reasoning_so_far(manager: ModelManager) -> None:
    thinker = RKLLM("qwen3-0.6b", manager=manager, thinking=True)
    chunks = list(thinker.stream_complete("why not?"))
    text = reasoning = ""
    for c in chunks:
        text += c.delta or ""
        reasoning += c.additional_kwargs.get("thinking_delta", "")
        assert c.text == text
    assert text == echo("why not?") and chunks[-1].delta == ""
    assert reasoning.startswith("The user wrote") and chunks[-1].additional_kwargs["reasoning_content"] == reasoning


# ----------------------------------------------------------------------------- thinking


def test_thinking_is_kept_out_of_the_answer(llm: RKLLM) -> None:
    r = llm.chat([user("why?")], thinking=True)
    thinking = [b for b in r.message.blocks if isinstance(b, ThinkingBlock)]
    assert len(thinking) == 1 and thinking[0].content.startswith("The user wrote")
    assert r.message.content == echo("why?") and "<think>" not in r.message.content

    chunks = list(llm.stream_chat([user("why not?")], thinking=True))
    deltas = "".join(c.additional_kwargs.get("thinking_delta", "") for c in chunks)
    assert deltas.startswith("The user wrote")
    assert "".join(c.delta or "" for c in chunks) == echo("why not?")
    final = chunks[-1].message
    assert [b.content for b in final.blocks if isinstance(b, ThinkingBlock)] == [deltas]

    c = RKLLM("qwen3-0.6b", manager=llm.manager, thinking=True).complete("so?")
    assert c.text == echo("so?") and c.additional_kwargs["reasoning_content"].startswith("The user wrote")
    assert "reasoning_content" not in llm.complete("so?").additional_kwargs  # thinking is off by default


# ----------------------------------------------------------------------------- tools


def test_chat_with_tools_and_get_tool_calls(llm: RKLLM) -> None:
    r = llm.chat_with_tools([WEATHER, ADD], user_msg="Please call get_weather('Paris').")
    calls = llm.get_tool_calls_from_response(r)
    assert len(calls) == 1 and isinstance(calls[0], ToolSelection)
    assert (calls[0].tool_name, calls[0].tool_kwargs) == ("get_weather", {"city": "Paris"})
    assert calls[0].tool_id.startswith("call_")
    # both the ToolCallBlock and the OpenAI-style additional_kwargs carry the call
    (block,) = [b for b in r.message.blocks if isinstance(b, ToolCallBlock)]
    assert block.tool_call_id == calls[0].tool_id and block.tool_kwargs == {"city": "Paris"}
    (oa,) = r.message.additional_kwargs["tool_calls"]
    assert (
        oa["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and oa["id"] == block.tool_call_id
    )

    plain = llm.chat_with_tools([WEATHER], user_msg="Just say hello.")
    assert plain.message.content == echo("Just say hello.")
    assert llm.get_tool_calls_from_response(plain, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(plain)


def test_tool_required_and_tool_choice(llm: RKLLM) -> None:
    r = llm.chat_with_tools([WEATHER], user_msg="What is it like outside?", tool_required=True)
    assert [c.tool_name for c in llm.get_tool_calls_from_response(r)] == ["get_weather"]
    r = llm.chat_with_tools([WEATHER, ADD], user_msg="Numbers please.", tool_choice="add")
    (call,) = llm.get_tool_calls_from_response(r)
    assert call.tool_name == "add" and set(call.tool_kwargs) == {"a", "b"}
    r = llm.chat_with_tools(
        [WEATHER, ADD], user_msg="Numbers.", tool_choice={"type": "function", "function": {"name": "add"}}
    )
    assert llm.get_tool_calls_from_response(r)[0].tool_name == "add"


def test_parallel_tool_calls(llm: RKLLM) -> None:
    msg = "Use two tools: get_weather('Oslo') and add(2, 3)."
    single = llm.chat_with_tools([WEATHER, ADD], user_msg=msg)
    assert [c.tool_name for c in llm.get_tool_calls_from_response(single)] == ["get_weather"]
    assert len(single.message.additional_kwargs["tool_calls"]) == 1
    both = llm.chat_with_tools([WEATHER, ADD], user_msg=msg, allow_parallel_tool_calls=True)
    calls = llm.get_tool_calls_from_response(both)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("add", {"a": 2, "b": 3}),
    ]


async def test_async_and_streamed_tool_calls(llm: RKLLM) -> None:
    r = await llm.achat_with_tools([WEATHER], user_msg="Call get_weather('Rome').")
    assert llm.get_tool_calls_from_response(r)[0].tool_kwargs == {"city": "Rome"}
    chunks = list(llm.stream_chat_with_tools([WEATHER], user_msg="Call get_weather('Lima')."))
    assert llm.get_tool_calls_from_response(chunks[-1])[0].tool_kwargs == {"city": "Lima"}
    gen = await llm.astream_chat_with_tools([WEATHER], user_msg="Call get_weather('Kyiv').")
    achunks = [c async for c in gen]
    assert llm.get_tool_calls_from_response(achunks[-1])[0].tool_kwargs == {"city": "Kyiv"}


def test_predict_and_call(llm: RKLLM) -> None:
    out = llm.predict_and_call([WEATHER, ADD], user_msg="Please run add(40, 2).")
    assert out.response == "42" and out.sources[0].tool_name == "add"


async def test_apredict_and_call(llm: RKLLM) -> None:
    out = await llm.apredict_and_call([WEATHER], user_msg="get_weather('Oslo') please")
    assert out.response == "It is sunny and 21 C in Oslo."


def test_tool_round_trip_reuses_the_kv_cache(llm: RKLLM, sim: SimulatorControl) -> None:
    history = [ChatMessage(role="system", content="You are a weather bot."), user("Call get_weather('Paris').")]
    r1 = llm.chat_with_tools([WEATHER], chat_history=list(history))
    (call,) = llm.get_tool_calls_from_response(r1)
    history += [
        r1.message,
        ChatMessage(
            role=MessageRole.TOOL,
            content=get_weather(**call.tool_kwargs),
            additional_kwargs={"tool_call_id": call.tool_id},
        ),
    ]
    sim.reset()
    r2 = llm.chat_with_tools([WEATHER], chat_history=list(history))
    assert r2.message.content == "Tool result: It is sunny and 21 C in Paris."
    assert r2.raw["kv_reused"] and sim.counter("kv_clears") == 0
    u = usage_of(r2.raw)
    assert u["prefilled_tokens"] == sim.counter("prefilled_tokens") < u["prompt_tokens"] / 3


def test_history_with_openai_style_tool_calls_only_still_matches(llm: RKLLM, sim: SimulatorControl) -> None:
    """Messages rebuilt by other code (only additional_kwargs["tool_calls"], JSON-string arguments) still match."""
    r1 = llm.chat_with_tools([WEATHER], user_msg="Call get_weather('Paris').")
    rebuilt = ChatMessage(
        role=MessageRole.ASSISTANT,
        content=r1.message.content,
        additional_kwargs={"tool_calls": r1.message.additional_kwargs["tool_calls"]},
    )
    call_id = rebuilt.additional_kwargs["tool_calls"][0]["id"]
    r2 = llm.chat_with_tools(
        [WEATHER],
        chat_history=[
            user("Call get_weather('Paris')."),
            rebuilt,
            ChatMessage(role="tool", content="rainy", additional_kwargs={"tool_call_id": call_id}),
        ],
    )
    assert r2.message.content == "Tool result: rainy" and r2.raw["kv_reused"]


def test_message_translation() -> None:
    msgs = [
        ChatMessage(role=MessageRole.DEVELOPER, content="sys"),
        ChatMessage(role="user", content="hi", additional_kwargs={"name": "ann"}),
        ChatMessage(
            role="assistant",
            blocks=[
                ThinkingBlock(content="hmm"),
                TextBlock(text="ok"),
                ToolCallBlock(tool_call_id="c1", tool_name="f", tool_kwargs='{"x": 1}'),
            ],
        ),
        ChatMessage(role="tool", content="done", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(
            role="assistant",
            content="",
            additional_kwargs={"tool_calls": [ToolSelection(tool_id="c2", tool_name="g", tool_kwargs={"y": 2})]},
        ),
        ChatMessage(role=MessageRole.FUNCTION, content="r2", additional_kwargs={"tool_call_id": "c2"}),
    ]
    out = to_core_messages(msgs)
    assert [m.role for m in out] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert out[1].name == "ann"
    assert out[2].content == "ok" and out[2].tool_calls == (ToolCallRequest("c1", "f", {"x": 1}),)  # no reasoning
    assert out[3].tool_call_id == "c1"
    assert out[4].tool_calls == (ToolCallRequest("c2", "g", {"y": 2}),)
    with pytest.raises(ValueError, match="images in user messages only"):
        to_core_messages([ChatMessage(role="assistant", blocks=[ImageBlock(url="http://example.com/a.png")])])


def test_bad_conversations_fail_before_the_runtime(llm: RKLLM, sim: SimulatorControl) -> None:
    with pytest.raises(ValueError):
        llm.chat([user("hi"), ChatMessage(role="assistant", content="hello")])  # cannot continue an assistant turn
    with pytest.raises(ValueError):
        llm.stream_chat([])  # fails at the call, not at the first chunk
    assert sim.counter("runs") == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # llama_index workflows inspect pydantic models
async def test_function_agent_calls_a_tool_and_answers(llm: RKLLM, sim: SimulatorControl) -> None:
    from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCallResult

    called: list[str] = []

    def lookup_weather(city: str) -> str:
        """Look up the weather for a city."""
        called.append(city)
        return f"It is sunny and 21 C in {city}."

    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(lookup_weather)], llm=llm, system_prompt="You are a weather bot."
    )
    handler = agent.run(user_msg="What is the weather in Paris? Call lookup_weather('Paris').")
    outputs, results = [], []
    async for ev in handler.stream_events():
        if isinstance(ev, AgentOutput):
            outputs.append(ev)
        elif isinstance(ev, ToolCallResult):
            results.append(ev)
    final = await handler
    assert called == ["Paris"] and results[0].tool_kwargs == {"city": "Paris"}
    assert str(final) == "Tool result: It is sunny and 21 C in Paris."
    assert [o.raw["kv_reused"] for o in outputs] == [False, True]  # the follow-up extended the KV cache
    assert sim.counter("kv_clears") <= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # llama_index workflows inspect pydantic models
async def test_function_agent_non_streaming(llm: RKLLM) -> None:
    from llama_index.core.agent.workflow import FunctionAgent

    agent = FunctionAgent(tools=[ADD], llm=llm, streaming=False)
    assert str(await agent.run(user_msg="Compute add(19, 23).")) == "Tool result: 42"


# ----------------------------------------------------------------------------- structured output


class Song(BaseModel):
    """A song."""

    title: str
    year: int


def test_structured_predict_function_calling(llm: RKLLM) -> None:
    from llama_index.core.prompts import PromptTemplate

    # LlamaIndex's default format prompt ("Here's a JSON schema to follow:") doubles the schema's braces.
    song = llm.structured_predict(Song, PromptTemplate("Name a song about {topic}."), topic="rain")
    assert isinstance(song, Song) and song.title and isinstance(song.year, int)
    sllm = llm.as_structured_llm(Song)
    reply = sllm.chat([user("Name a song about the sea.")])
    assert isinstance(reply.raw, Song)


async def test_astructured_predict(llm: RKLLM) -> None:
    from llama_index.core.prompts import PromptTemplate

    song = await llm.astructured_predict(Song, PromptTemplate("Name a song about {topic}."), topic="snow")
    assert isinstance(song, Song)


class _PlainSchemaParser:
    """A PydanticOutputParser whose instructions carry the schema as plain JSON after 'JSON schema:'."""

    @staticmethod
    def make() -> object:
        from llama_index.core.output_parsers import PydanticOutputParser

        class Parser(PydanticOutputParser):  # type: ignore[type-arg]
            def format(self, query: str) -> str:
                return query + "\n\nJSON schema: " + self.get_format_string(escape_json=False)

        return Parser(Song, pydantic_format_tmpl="{schema}")


def test_structured_output_by_text_completion(llm: RKLLM) -> None:
    """The text path (LLMTextCompletionProgram): RKLLM returns the model's JSON text for the parser."""
    from llama_index.core.program import LLMTextCompletionProgram

    program = LLMTextCompletionProgram.from_defaults(
        output_parser=_PlainSchemaParser.make(), prompt_template_str="Name a song about {topic}.", llm=llm
    )
    song = program(topic="rain")
    assert isinstance(song, Song) and song.title and isinstance(song.year, int)


def test_structured_predict_text_mode_with_default_prompt(llm: RKLLM) -> None:
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.types import PydanticProgramMode

    llm.pydantic_program_mode = PydanticProgramMode.LLM
    # LlamaIndex's default format prompt ("Here's a JSON schema to follow:") doubles the schema's braces.
    song = llm.structured_predict(Song, PromptTemplate("Name a song about {topic}."), topic="rain")
    assert isinstance(song, Song)


# ----------------------------------------------------------------------------- KV reuse and aborts


def test_multi_turn_chat_prefills_only_new_messages(llm: RKLLM, sim: SimulatorControl) -> None:
    history = [ChatMessage(role="system", content="You answer in one sentence.")]
    prefilled: list[int] = []
    prompt_sizes: list[int] = []
    for turn in range(5):
        history.append(user(f"Question {turn}: what is {turn} plus {turn}?"))
        sim.reset()
        r = llm.chat(history)
        assert r.message.content == echo(history[-1].content)
        assert r.raw["kv_reused"] == (turn > 0)
        prefilled.append(sim.counter("prefilled_tokens"))
        history.append(r.message)
        prompt_sizes.append(usage_of(r.raw)["prompt_tokens"])
    kv_size = usage_of(r.raw)["total_tokens"]  # everything now in the KV cache
    assert sum(prefilled) <= 1.1 * kv_size  # each token prefilled about once
    assert sum(prompt_sizes) > 2.5 * sum(prefilled)  # what re-prefilling every turn would have cost


def test_closing_a_stream_early_aborts(llm: RKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 2)
    gen = llm.stream_chat([user("count to 2000")])
    for i, _ in enumerate(gen):
        if i == 3:
            break
    gen.close()
    assert sim.counter("aborts") == 1
    assert llm.complete("after").text == echo("after")  # the model keeps serving


async def test_cancelling_an_async_call_aborts(llm: RKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 2)
    task = asyncio.create_task(llm.achat([user("count to 5000")]))
    for _ in range(500):
        await asyncio.sleep(0.01)
        if sim.counter("generated_tokens") >= 5:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if sim.counter("active_runs") == 0:
            break
        await asyncio.sleep(0.01)
    assert sim.counter("aborts") == 1 and sim.counter("generated_tokens") < 5000
    assert (await llm.acomplete("after")).text == echo("after")


async def test_closing_an_async_stream_aborts(llm: RKLLM, sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 2)
    gen = await llm.astream_complete("count to 5000")
    async for chunk in gen:
        if chunk.text.count(" ") >= 3:
            break
    await gen.aclose()
    for _ in range(200):
        if sim.counter("active_runs") == 0:
            break
        await asyncio.sleep(0.01)
    assert sim.counter("aborts") == 1
    assert (await llm.acomplete("after")).text == echo("after")


def test_importable_from_the_llama_index_namespace() -> None:
    from llama_index.llms.rkllm import RKLLM as Namespaced

    assert Namespaced is RKLLM
