"""The chat engine against the simulator: KV-cache reuse, rebuilds, tools, thinking, stops, limits.

Prefill claims are measured with the simulator's own counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core.chat.engine import ChatDone, ChatEngine, ReasoningDelta, TextDelta, ToolCall
from rkllm_core.chat.messages import ChatMessage, ToolCallRequest
from rkllm_core.chat.options import ChatOptions
from rkllm_core.errors import ContextLengthError, InvalidParameterError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.params import SamplingParams
from rkllm_core.sim import SimulatorControl, make_model

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"  # ChatML family: engine renders
OTHER = "mymodel-1b-w8a8-ctx4096.rkllm"  # unknown family: built-in template + transcript fallback
SMALL = "Qwen_Qwen2.5-0.5B-Instruct-w8a8-ctx1024-rk3588.rkllm"

MAGIC = {
    "type": "function",
    "function": {
        "name": "magic_function",
        "description": "Applies a magic function to an input.",
        "parameters": {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]},
    },
}


def U(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def A(text: str, calls: tuple[ToolCallRequest, ...] = ()) -> ChatMessage:
    return ChatMessage("assistant", text, tool_calls=calls)


def S(text: str) -> ChatMessage:
    return ChatMessage("system", text)


def echo(prompt: str) -> str:
    return f"Echo: {prompt} — ok."


@pytest.fixture
def models(model_dir: Path) -> Path:
    make_model(model_dir, QWEN)
    make_model(model_dir, OTHER, think=False)
    make_model(model_dir, SMALL, think=False)
    return model_dir


@pytest.fixture
def make_engine(models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[Callable[..., ChatEngine]]:
    managers: list[ModelManager] = []

    def factory(max_loaded: int = 1, **kwargs: object) -> ChatEngine:
        m = ModelManager(ModelRegistry([models], platform=None), library=sim_lib, max_loaded=max_loaded)
        managers.append(m)
        kwargs.setdefault("prompt_cache", False)
        return ChatEngine(m, **kwargs)  # type: ignore[arg-type]

    yield factory
    for m in managers:
        m.close()


def done_of(events: list[object]) -> ChatDone:
    assert isinstance(events[-1], ChatDone)
    return events[-1]


@pytest.mark.parametrize("model", ["qwen3-0.6b", "mymodel-1b"])
def test_basic_chat(make_engine: Callable[..., ChatEngine], sim: SimulatorControl, model: str) -> None:
    engine = make_engine()
    events = list(engine.stream(model, [S("Be brief."), U("hello")]))
    done = done_of(events)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == echo("hello") == done.message.content
    assert done.finish_reason == "stop" and done.model == model
    u = done.usage
    assert u.output_tokens == sim.counter("generated_tokens") > 0
    assert u.prefilled_tokens == sim.counter("prefilled_tokens") > 0
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.input_tokens >= u.prefilled_tokens


@pytest.mark.parametrize("model", ["qwen3-0.6b", "mymodel-1b"])
def test_ten_turn_replay_prefills_each_token_about_once(
    make_engine: Callable[..., ChatEngine], sim: SimulatorControl, model: str
) -> None:
    def converse(engine: ChatEngine) -> tuple[int, int]:
        sim.reset()
        history = [S("You are a helpful assistant that answers in one sentence.")]
        for turn in range(10):
            history.append(U(f"Question number {turn}: what is {turn} plus {turn}?"))
            reply = engine.chat(model, history)
            assert reply.message.content == echo(history[-1].content)
            assert reply.kv_reused == (turn > 0 and engine.reuse_kv)
            history.append(reply.message)
        manager = engine.manager
        with manager.lease(model) as lease:
            unique = lease.runtime.kv_cache_size()
        return sim.counter("prefilled_tokens"), unique

    prefilled, unique = converse(make_engine())
    assert prefilled <= 1.1 * unique, (prefilled, unique)
    naive, naive_unique = converse(make_engine(reuse_kv=False))
    assert naive > 3 * naive_unique  # what re-prefilling every turn costs


def test_history_with_assistant_turns_is_rendered_faithfully(
    make_engine: Callable[..., ChatEngine], sim: SimulatorControl
) -> None:
    sim.set("trace", 1)
    engine = make_engine()
    call = ToolCallRequest("call_1", "magic_function", {"input": 3})
    msgs = [
        S("sys"),
        U("first"),
        A("", (call,)),
        ChatMessage("tool", "5", tool_call_id="call_1"),
        A("It is 5."),
        U("next"),
    ]
    reply = engine.chat("qwen3-0.6b", msgs, ChatOptions(tools=(MAGIC,)))
    assert reply.message.content == echo("next") and not reply.kv_reused
    slot = [t for t in sim.trace() if t["fn"] == "rkllm_set_chat_template"][-1]["system_prompt"]
    assert slot.startswith("<|im_start|>system\nsys\n\n# Tools")
    assert '"name": "magic_function"' in slot
    assert "<|im_start|>user\nfirst<|im_end|>\n" in slot
    call_json = '{"name": "magic_function", "arguments": {"input": 3}}'
    assert f"<|im_start|>assistant\n<tool_call>\n{call_json}\n</tool_call><|im_end|>" in slot
    assert (
        "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 5.<|im_end|>\n"
        in slot
    )


def test_native_fallback_uses_a_transcript(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    sim.set("trace", 1)
    engine = make_engine()
    reply = engine.chat("mymodel-1b", [S("sys"), U("first"), A("answer one"), U("second")])
    assert reply.message.content == echo("second")
    tools_call = [t for t in sim.trace() if t["fn"] == "rkllm_set_function_tools"][-1]
    assert tools_call["system_prompt"] == "sys\n\nConversation so far:\nUser: first\nAssistant: answer one"


def test_rebuild_edge_cases(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    engine = make_engine()
    a = [S("one"), U("a1")]
    ra = engine.chat("qwen3-0.6b", a)
    a += [ra.message, U("a2")]
    assert engine.chat("qwen3-0.6b", a).kv_reused
    # another system prompt: rebuild
    assert not engine.chat("qwen3-0.6b", [S("two"), U("b1")]).kv_reused
    # back to the first conversation: rebuilt (its turns are no longer in the cache), still correct
    back = engine.chat("qwen3-0.6b", a)
    assert back.message.content == echo("a2") and not back.kv_reused
    # an edited earlier turn: rebuild
    edited = [S("one"), U("a1"), A("something else"), U("a3")]
    assert not engine.chat("qwen3-0.6b", edited).kv_reused


def test_stop_sequence_cut_forces_rebuild(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    engine = make_engine()
    msgs = [U("count to 500")]
    reply = engine.chat("qwen3-0.6b", msgs, ChatOptions(stop=(" 7",)))
    assert reply.message.content == "1 2 3 4 5 6" and reply.finish_reason == "stop"
    assert sim.counter("aborts") == 1  # the hit stopped the NPU
    assert sim.counter("generated_tokens") < 100
    follow = engine.chat("qwen3-0.6b", [*msgs, reply.message, U("more")])
    assert not follow.kv_reused and follow.message.content == echo("more")


def test_early_close_aborts_and_forces_rebuild(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    sim.set("token_delay_ms", 1)
    engine = make_engine()
    stream = engine.stream("qwen3-0.6b", [U("count to 3000")])
    next(stream)
    stream.close()
    assert sim.counter("aborts") == 1
    reply = engine.chat("qwen3-0.6b", [U("count to 3000"), A("1 2"), U("again")])
    assert not reply.kv_reused and reply.message.content == echo("again")


def test_model_swap_in_between(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    engine = make_engine(max_loaded=1)
    msgs = [U("hi")]
    r1 = engine.chat("qwen3-0.6b", msgs)
    engine.chat("mymodel-1b", [U("other")])  # swaps qwen out
    r2 = engine.chat("qwen3-0.6b", [*msgs, r1.message, U("still there?")])
    assert not r2.kv_reused and r2.message.content == echo("still there?")
    assert sim.counter("inits") == 3


@pytest.mark.parametrize("model", ["qwen3-0.6b", "mymodel-1b"])
def test_tool_call_round_trip(make_engine: Callable[..., ChatEngine], sim: SimulatorControl, model: str) -> None:
    engine = make_engine()
    opts = ChatOptions(tools=(MAGIC,))
    msgs = [U("What is the value of magic_function(3)? Use the tool.")]
    events = list(engine.stream(model, msgs, opts))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [("magic_function", {"input": 3})]
    done = done_of(events)
    assert done.message.content == "" and done.message.tool_calls[0].id == calls[0].id
    assert "<tool_call>" not in "".join(e.text for e in events if isinstance(e, TextDelta))
    msgs += [done.message, ChatMessage("tool", "5", tool_call_id=calls[0].id)]
    answer = engine.chat(model, msgs, opts)
    # ChatML: results are rendered in a <tool_response> block; built-in template: role="tool", a JSON array.
    assert answer.message.content == ("Tool result: 5" if model == "qwen3-0.6b" else "Tool result: [5]")
    assert answer.kv_reused


def test_forced_tool_choice(make_engine: Callable[..., ChatEngine]) -> None:
    engine = make_engine()
    reply = engine.chat(
        "qwen3-0.6b", [U("Tell me something.")], ChatOptions(tools=(MAGIC,), tool_choice="magic_function")
    )
    assert [c.name for c in reply.message.tool_calls] == ["magic_function"]
    none = engine.chat("qwen3-0.6b", [U("Use magic_function(2)")], ChatOptions(tools=(MAGIC,), tool_choice="none"))
    assert not none.message.tool_calls


@pytest.mark.parametrize("model", ["qwen3-0.6b"])
def test_thinking_is_separated(make_engine: Callable[..., ChatEngine], model: str) -> None:
    engine = make_engine()
    events = list(engine.stream(model, [U("why")], ChatOptions(enable_thinking=True)))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert reasoning.startswith("The user wrote") and text == echo("why")
    done = done_of(events)
    assert done.reasoning == reasoning and done.message.content == text
    plain = engine.chat(model, [U("why")])
    assert plain.reasoning == "" and plain.message.content == echo("why")


def test_prompt_too_long_is_refused_before_the_runtime(
    make_engine: Callable[..., ChatEngine], sim: SimulatorControl
) -> None:
    engine = make_engine()
    with pytest.raises(ContextLengthError) as info:
        engine.chat("qwen2.5-0.5b", [U("word " * 3000)])
    assert info.value.limit == 1024
    assert sim.counter("runs") == 0


def test_long_conversation_drops_oldest_turns(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    engine = make_engine(reuse_kv=False)
    history: list[ChatMessage] = [S("sys")]
    for i in range(12):
        history += [U(f"turn {i} " + "blah " * 40), A(f"reply {i} " + "yada " * 40)]
    history.append(U("latest"))
    reply = engine.chat("qwen2.5-0.5b", history, ChatOptions(max_new_tokens=64))
    assert reply.message.content == echo("latest")
    assert reply.usage.input_tokens <= 1024


def test_bad_input_is_typed(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    engine = make_engine()
    with pytest.raises(InvalidParameterError, match="empty"):
        engine.chat("qwen3-0.6b", [])
    with pytest.raises(InvalidParameterError, match="last message"):
        engine.chat("qwen3-0.6b", [U("x"), A("y")])
    with pytest.raises(InvalidParameterError):
        ChatOptions(sampling=SamplingParams(temperature=-1))
    with pytest.raises(InvalidParameterError, match="JSON"):
        engine.chat("qwen3-0.6b", [U("x")], ChatOptions(tools=({"name": "f", "parameters": {"x": object()}},)))
    with pytest.raises(InvalidParameterError):
        ChatOptions(stop=("",))
    with pytest.raises(InvalidParameterError):
        ChatOptions(tools=(MAGIC,), tool_choice="nonexistent")
    with pytest.raises(InvalidParameterError):
        ChatMessage("robot", "x")  # type: ignore[arg-type]
    assert sim.counter("runs") == 0


def test_invalid_text_and_tools_are_refused_before_the_handle_is_touched(
    make_engine: Callable[..., ChatEngine], sim: SimulatorControl
) -> None:
    engine = make_engine()
    engine.chat("qwen3-0.6b", [S("A fine system prompt."), U("warm up")])  # something in the KV cache
    touched = {k: sim.counter(k) for k in ("runs", "kv_clears", "template_sets", "tools_sets")}
    with pytest.raises(InvalidParameterError, match=r"user message content is not valid text.* position 4"):
        U("bad \ud800 text")
    with pytest.raises(InvalidParameterError, match="system message content contains a NUL character at position 3"):
        S("sys\0tem")
    with pytest.raises(InvalidParameterError, match="tool call 'f' arguments is not valid text"):
        A("", (ToolCallRequest("c1", "f", {"x": "\udfff"}),))
    bad_tools = [
        ({"name": "f", "parameters": "not a schema"}, "tool 'f': parameters must be a JSON schema object"),
        ({"name": "f", "parameters": {"type": "object", "properties": {"x": {"default": float("nan")}}}}, "tool 'f'"),
        ({"name": "f", "description": "lone \ud800"}, "tool 'f' description is not valid text"),
        ({"name": "no spaces allowed"}, "tool #0: the name"),
        ({"type": "function", "function": "f"}, "tool #0: expected an OpenAI-style function tool"),
        ({"name": "f", "parameters": {"type": "array"}}, "must be of type 'object'"),
    ]
    for tool, message in bad_tools:
        with pytest.raises(InvalidParameterError, match=message):
            engine.chat("qwen3-0.6b", [U("x")], ChatOptions(tools=(tool,)))  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="stop sequence #1 is not valid text"):
        ChatOptions(stop=("ok", "\udc80"))
    assert {k: sim.counter(k) for k in touched} == touched  # nothing reached the runtime, the KV cache is intact
    assert engine.chat("qwen3-0.6b", [U("still fine")]).message.content == echo("still fine")


def test_names_and_consecutive_messages(make_engine: Callable[..., ChatEngine]) -> None:
    engine = make_engine()
    reply = engine.chat("qwen3-0.6b", [U("one"), ChatMessage("user", "two", name="bob")])
    assert reply.message.content == echo("one\nbob: two")


def test_sampling_per_abi(make_engine: Callable[..., ChatEngine], sim: SimulatorControl, abi: str) -> None:
    engine = make_engine()
    engine.chat("qwen3-0.6b", [U("a")], ChatOptions(sampling=SamplingParams(temperature=0.3), max_new_tokens=40))
    engine.chat("qwen3-0.6b", [U("b")], ChatOptions(sampling=SamplingParams(temperature=0.9), max_new_tokens=40))
    assert sim.counter("inits") == (2 if abi == "1.2" else 1)


async def test_async_stream_and_cancel(make_engine: Callable[..., ChatEngine], sim: SimulatorControl) -> None:
    engine = make_engine()
    events = [e async for e in engine.astream("qwen3-0.6b", [U("hello")])]
    assert done_of(events).message.content == echo("hello")
    sim.set("token_delay_ms", 1)
    got = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.astream("qwen3-0.6b", [U("count to 3000")]):
            got.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    reply = await engine.achat("qwen3-0.6b", [U("after")])
    assert reply.message.content == echo("after")
    assert sim.counter("aborts") == 1


def test_concurrent_conversations_get_their_own_answers(make_engine: Callable[..., ChatEngine]) -> None:
    import threading

    engine = make_engine(max_loaded=2)
    out: dict[int, str] = {}

    def go(i: int) -> None:
        model = "qwen3-0.6b" if i % 2 else "mymodel-1b"
        out[i] = engine.chat(model, [U(f"prompt {i}")]).message.content

    threads = [threading.Thread(target=go, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {i: echo(f"prompt {i}") for i in range(10)}


async def test_cancel_while_loading_releases_the_lease(
    make_engine: Callable[..., ChatEngine], sim: SimulatorControl
) -> None:
    sim.set("init_delay_ms", 300)
    engine = make_engine()
    task = asyncio.create_task(engine.achat("qwen3-0.6b", [U("hi")]))
    await asyncio.sleep(0.05)  # the model is loading in a worker thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancel did not wait for the load: the model is still loading, and no lease was taken.
    loading = engine.manager.loaded()
    assert [e.loading for e in loading] == [True] and loading[0].leases == 0
    # The load finishes on its own; the idle model is then unloaded at once.
    assert await asyncio.to_thread(engine.manager.unload, "qwen3-0.6b", timeout=1) == 1
    assert sim.counter("runs") == 0
