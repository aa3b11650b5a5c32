"""ChatRKLLM without generating: construction, settings, message translation, tool choice, chunk mapping.

Only the construction test touches the simulator, to prove through its counters
that creating and configuring a model never loads the library or a model.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import tool
from pydantic import BaseModel, Field, ValidationError
from typing_extensions import TypedDict

import rkllm_core.native.library
from langchain_rkllm import ChatRKLLM, UnsupportedContentError
from langchain_rkllm._convert import to_core_messages
from langchain_rkllm.chat_models import _ChunkMapper, _result
from rkllm_core.chat.engine import ChatDone, InvalidToolCall, ReasoningDelta, TextDelta, ToolCall, ToolCallDelta, Usage
from rkllm_core.chat.messages import ChatMessage as CoreMessage
from rkllm_core.chat.messages import ToolCallRequest
from rkllm_core.errors import InvalidParameterError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"


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
    """Get the weather at a location."""
    return "sunny"


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


def model(**kwargs: Any) -> ChatRKLLM:
    return ChatRKLLM(**{"model": "qwen3-0.6b", "library_path": "/nonexistent/librkllmrt.so", **kwargs})


# -- construction never loads anything --------------------------------------------------------------------------


def test_construction_and_configuration_never_load(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "pcache"))
    make_model(model_dir, QWEN)
    before = sim.counters()
    manager = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib)
    try:
        chat = ChatRKLLM(model="qwen3-0.6b", manager=manager, temperature=0.2, max_tokens=32, reasoning=True)
        chat.bind_tools([get_weather], tool_choice="any")
        chat.with_structured_output(Joke)
        chat.with_structured_output(JokeDict, method="json_schema", include_raw=True)
        chat._get_ls_params()
        assert chat._identifying_params["model"] == "qwen3-0.6b"
        assert chat.get_num_tokens("hello world") > 0
        after = sim.counters()
        assert after["inits"] == before["inits"] and after["live_handles"] == before["live_handles"]
        assert after["runs"] == before["runs"]
        assert chat.invoke("hello").content == "Echo: hello — ok."  # the first call loads
        assert sim.counter("inits") == before["inits"] + 1
    finally:
        manager.close()

    # A library path that was never loaded stays unloaded through construction (and binding).
    fresh = tmp_path / "fresh" / "librkllmrt.so"
    fresh.parent.mkdir()
    shutil.copy(sim_lib.path, fresh)
    keys = set(rkllm_core.native.library._loaded)
    chat = ChatRKLLM(model="qwen3-0.6b", model_dir=str(model_dir), library_path=fresh)
    chat.bind_tools([get_weather])
    assert set(rkllm_core.native.library._loaded) == keys
    assert chat.library_path == str(fresh)  # a Path is accepted and stored as a str


# -- settings ---------------------------------------------------------------------------------------------------


def test_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    m = model()
    assert m._llm_type == "rkllm"
    assert m.temperature is None and m.max_tokens is None and m.reasoning is None and m.manager is None
    with pytest.raises(ValidationError, match="temperature"):
        model(temperature=-1)
    with pytest.raises(ValidationError, match="top_p"):
        model(top_p=0)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        model(max_tokens=0)
    with pytest.raises(ValidationError, match="empty"):
        model(stop=[""])
    with pytest.raises(ValidationError, match="either manager"):
        ChatRKLLM(model="x", manager=ModelManager(ModelRegistry(["/nonexistent"])), model_dir="/tmp")
    monkeypatch.delenv("RKLLM_MODEL", raising=False)
    with pytest.raises(ValueError, match="RKLLM_MODEL"):
        ChatRKLLM()
    monkeypatch.setenv("RKLLM_MODEL", "gemma3-1b")
    assert ChatRKLLM().model == "gemma3-1b"


def test_unknown_arguments() -> None:
    with pytest.warns(UserWarning, match="temprature"):
        model(temprature=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(max_retries=2, api_key="x")  # cross-provider arguments: accepted silently, ignored
    with pytest.raises(TypeError, match="unsupported call argument.*foo"):
        model()._request([HumanMessage("hi")], None, {"foo": 1})


def test_identifying_and_langsmith_params() -> None:
    m = model(temperature=0.3, max_tokens=64, stop=["\n\n"], top_k=20, reasoning=True, model_dir="/models")
    ident = m._identifying_params
    for key in ("model", "temperature", "max_tokens", "stop", "top_k", "top_p", "reasoning", "model_dir"):
        assert key in ident
    assert ident["temperature"] == 0.3 and ident["reasoning"] is True and ident["model_dir"] == "/models"
    assert m._get_ls_params() == {
        "ls_provider": "rkllm",
        "ls_model_name": "qwen3-0.6b",
        "ls_model_type": "chat",
        "ls_temperature": 0.3,
        "ls_max_tokens": 64,
        "ls_stop": ["\n\n"],
    }
    over = m._get_ls_params(stop=["x"], model="gemma3-1b", temperature=0.9, max_tokens=8)
    assert over["ls_model_name"] == "gemma3-1b" and over["ls_stop"] == ["x"]
    assert over["ls_temperature"] == 0.9 and over["ls_max_tokens"] == 8
    assert "ls_stop" not in model()._get_ls_params()


def test_request_options() -> None:
    m = model(temperature=0.5, top_p=0.9, max_tokens=50, stop=["END"], timeout=3)
    name, msgs, opts = m._request([HumanMessage("hi")], None, {})
    assert name == "qwen3-0.6b" and msgs == [CoreMessage("user", "hi")]
    assert opts.sampling is not None and opts.sampling.temperature == 0.5 and opts.sampling.top_p == 0.9
    assert opts.max_new_tokens == 50 and opts.stop == ("END",) and opts.timeout == 3 and not opts.enable_thinking
    name, _, opts = m._request(
        [HumanMessage("hi")], ["STOP"], {"model": "other", "temperature": 0.1, "max_tokens": 5, "reasoning": True}
    )
    assert name == "other" and opts.stop == ("STOP",) and opts.max_new_tokens == 5 and opts.enable_thinking
    assert opts.sampling is not None and opts.sampling.temperature == 0.1 and opts.sampling.top_p == 0.9
    assert model()._request([HumanMessage("hi")], None, {})[2].sampling is None


# -- message translation ----------------------------------------------------------------------------------------


def test_message_translation() -> None:
    msgs = [
        SystemMessage("Be brief."),
        SystemMessage("Be kind."),
        HumanMessage("hello", name="alice"),
        HumanMessage([{"type": "text", "text": "part one"}, "part two"]),
        AIMessage(
            [{"type": "text", "text": "Let me "}, {"type": "text", "text": "check."}, {"type": "tool_use", "id": "t"}],
            tool_calls=[{"name": "get_weather", "args": {"location": "Paris"}, "id": "c1", "type": "tool_call"}],
        ),
        ToolMessage("sunny", tool_call_id="c1", name="get_weather"),
        AIMessage("It is sunny.", additional_kwargs={"reasoning_content": "thinking..."}),
        ChatMessage(role="developer", content="Use metric units."),
        ChatMessage(role="human", content="And tomorrow?"),
        FunctionMessage(content="rain", name="forecast"),
    ]
    core = to_core_messages(msgs)
    assert [c.role for c in core] == [
        "system",
        "system",
        "user",
        "user",
        "assistant",
        "tool",
        "assistant",
        "system",
        "user",
        "tool",
    ]
    assert core[2] == CoreMessage("user", "hello", name="alice")
    assert core[3].content == "part one\npart two"  # separate user parts: one per line
    assert core[4].content == "Let me check."  # pieces of one reply: joined as they are
    assert core[4].tool_calls == (ToolCallRequest("c1", "get_weather", {"location": "Paris"}),)
    assert core[5] == CoreMessage("tool", "sunny", name="get_weather", tool_call_id="c1")
    assert core[6].content == "It is sunny."  # reasoning is never sent back
    assert core[9] == CoreMessage("tool", "rain", name="forecast")


def test_assistant_reasoning_and_thinking_blocks_are_dropped() -> None:
    ai = AIMessage(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "x"},
            {"type": "reasoning", "reasoning": "hmm"},
            {"type": "text", "text": "Hello!", "cache_control": {"type": "ephemeral"}},
        ]
    )
    assert to_core_messages([ai])[0].content == "Hello!"


def test_tool_message_with_blocks_and_raw_json() -> None:
    msg = ToolMessage(content=[{"type": "text", "text": "a"}, {"result": 3}], tool_call_id="1")  # type: ignore[list-item]
    assert to_core_messages([msg])[0].content == 'a\n{"result": 3}'


@pytest.mark.parametrize(
    ("block", "modality"),
    [
        ({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}, "audio"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"type": "file", "base64": "AAAA", "mime_type": "application/pdf"}, "file"),
        ({"type": "video", "url": "https://example.com/v.mp4"}, "video"),
    ],
)
def test_unsupported_modalities_are_refused_clearly(block: dict[str, Any], modality: str) -> None:
    for message in (
        HumanMessage([{"type": "text", "text": "look"}, block]),
        ToolMessage(content=[block], tool_call_id="1"),
    ):
        with pytest.raises(UnsupportedContentError, match=f"cannot take {modality}") as info:
            to_core_messages([message])
        assert info.value.modality == modality and "text and images only" in str(info.value)
        assert isinstance(info.value, ValueError)


def test_unknown_blocks_roles_and_types_are_errors() -> None:
    with pytest.raises(InvalidParameterError, match="unsupported content block type 'mystery'"):
        to_core_messages([HumanMessage([{"type": "mystery"}])])
    with pytest.raises(InvalidParameterError, match="unknown role 'narrator'"):
        to_core_messages([ChatMessage(role="narrator", content="x")])


def test_response_format_reaches_the_core_options() -> None:
    request = {"response_format": {"type": "json_object"}}
    _, _, options = model()._request([HumanMessage("Tell me a joke.")], None, request)
    assert options.response_format == {"type": "json_object"}


# -- tools and structured output --------------------------------------------------------------------------------


def test_bind_tools_formats_and_passes_through() -> None:
    bound = model().bind_tools(
        [get_weather, Joke, {"name": "pick", "input_schema": {"type": "object"}}], tool_choice="any"
    )
    assert isinstance(bound, RunnableBinding)
    tools, choice = bound.kwargs["tools"], bound.kwargs["tool_choice"]
    assert [t["function"]["name"] for t in tools] == ["get_weather", "Joke", "pick"]
    assert choice == "required"
    _, _, opts = model()._request([HumanMessage("hi")], None, bound.kwargs)
    assert opts.tool_names() == ("get_weather", "Joke", "pick") and opts.tool_choice == "required"
    assert (
        model().bind_tools([get_weather], strict=True, parallel_tool_calls=False).kwargs["parallel_tool_calls"] is False
    )


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
@pytest.mark.parametrize("schema", [Joke, JokeDict, Joke.model_json_schema()], ids=["pydantic", "typeddict", "dict"])
def test_structured_output_binds_the_schema(method: str, schema: Any) -> None:
    runnable = model().with_structured_output(schema, method=method, strict=True)  # type: ignore[arg-type]
    binding = runnable.first  # type: ignore[attr-defined]
    kwargs = binding.kwargs
    assert kwargs["ls_structured_output_format"] == {"kwargs": {"method": method}, "schema": schema}
    if method == "function_calling":
        assert kwargs["tool_choice"] in ("Joke", "JokeDict")
    else:
        fmt = kwargs["response_format"]
        assert fmt["type"] == ("json_schema" if method == "json_schema" else "json_object")
        inner = fmt["json_schema"]["schema"] if method == "json_schema" else fmt["schema"]
        assert set(inner["properties"]) == {"setup", "punchline"}


def test_structured_output_errors() -> None:
    with pytest.raises(ValueError, match="method must be"):
        model().with_structured_output(Joke, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported arguments"):
        model().with_structured_output(Joke, foo=1)
    with pytest.raises(ValueError, match="schema must be given"):
        model().with_structured_output(None)
    assert model().with_structured_output(None, method="json_mode") is not None


# -- event -> chunk mapping -------------------------------------------------------------------------------------


def _done(calls: tuple[ToolCallRequest, ...] = (), invalid: tuple[InvalidToolCall, ...] = ()) -> ChatDone:
    return ChatDone(
        finish_reason="stop",
        message=CoreMessage("assistant", "Hi there", tool_calls=calls),
        reasoning="pondering",
        usage=Usage(input_tokens=40, output_tokens=6, total_tokens=46, prefilled_tokens=10),
        stats=None,
        model="qwen3-0.6b",
        invalid_tool_calls=invalid,
        kv_reused=True,
    )


def test_chunk_mapping_and_final_message() -> None:
    call = ToolCallRequest("call_1", "get_weather", {"location": "Paris"})
    bad = InvalidToolCall(id="call_2", raw='{"name": "x", "arguments": 5}', error="arguments must be an object")
    events = [
        ReasoningDelta("ponder"),
        ReasoningDelta("ing"),
        TextDelta("Hi "),
        TextDelta("there"),
        ToolCallDelta(0, "call_1", "get_weather", '{"location": '),
        ToolCallDelta(0, None, None, '"Paris"}'),
        ToolCall("call_1", "get_weather", {"location": "Paris"}, raw="..."),
        InvalidToolCall(id="call_2", raw=bad.raw, error=bad.error, index=1),
        _done((call,), (bad,)),
    ]
    mapper = _ChunkMapper()
    chunks = [c for c in (mapper.chunk(e) for e in events) if c is not None]
    assert all(isinstance(c, ChatGenerationChunk) for c in chunks)
    msgs = [c.message for c in chunks]
    assert all(isinstance(m, AIMessageChunk) for m in msgs)
    assert msgs[0].additional_kwargs == {"reasoning_content": "ponder"} and msgs[0].content == ""
    assert msgs[2].content == "Hi "
    assert msgs[4].tool_call_chunks == [
        {"name": "get_weather", "args": '{"location": ', "id": "call_1", "index": 0, "type": "tool_call_chunk"}
    ]
    assert msgs[5].tool_call_chunks[0]["id"] is None and msgs[5].tool_call_chunks[0]["index"] == 0
    assert msgs[6].invalid_tool_calls[0]["error"] == bad.error  # nothing was streamed for it
    last = msgs[-1]
    assert last.chunk_position == "last" and last.content == ""
    assert last.usage_metadata == {
        "input_tokens": 40,
        "output_tokens": 6,
        "total_tokens": 46,
        "input_token_details": {"cache_read": 30},
    }
    assert last.response_metadata["model_provider"] == "rkllm" and last.response_metadata["finish_reason"] == "stop"
    assert last.response_metadata["prefilled_tokens"] == 10 and last.response_metadata["kv_reused"] is True
    assert all(m.usage_metadata is None and not m.response_metadata for m in msgs[:-1])  # only the last one

    agg = msgs[0]
    for m in msgs[1:]:
        agg = agg + m
    assert agg.content == "Hi there" and agg.additional_kwargs["reasoning_content"] == "pondering"
    assert agg.tool_calls[0]["args"] == {"location": "Paris"}

    result = _result(chunks, _done((call,), (bad,)))
    final = result.generations[0].message
    assert type(final) is AIMessage and final.content == "Hi there"
    assert final.tool_calls == [
        {"name": "get_weather", "args": {"location": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    assert final.invalid_tool_calls == [
        {"name": None, "args": bad.raw, "id": "call_2", "error": bad.error, "type": "invalid_tool_call"}
    ]
    assert final.additional_kwargs == {"reasoning_content": "pondering"}
    assert final.usage_metadata is not None and final.usage_metadata["total_tokens"] == 46


def test_invalid_call_after_streamed_pieces_is_left_to_aggregation() -> None:
    mapper = _ChunkMapper()
    assert mapper.chunk(ToolCallDelta(0, "c", "f", '{"a": ')) is not None
    assert mapper.chunk(InvalidToolCall(id="c", raw='{"name": "f", "arguments": {"a": ', error="unterminated")) is None
