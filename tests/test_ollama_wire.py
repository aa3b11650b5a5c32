"""Ollama's wire format, without HTTP: requests to core types, core results to Ollama's objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.chat.engine import ChatDone, ReasoningDelta, TextDelta, ToolCall, ToolCallDelta, Usage
from rkllm_core.chat.messages import ChatMessage, ImagePart, ToolCallRequest
from rkllm_core.errors import InvalidParameterError, ModelNotFoundError
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.params import PerfStats
from rkllm_core.serve import ollama_wire as ow
from rkllm_core.serve.wire import WireError
from rkllm_core.sim import make_model

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
USER = [{"role": "user", "content": "hi"}]


def done(text: str = "hello", *, reason: str = "stop", stats: bool = True, calls: tuple[Any, ...] = ()) -> ChatDone:
    return ChatDone(
        finish_reason=reason,  # type: ignore[arg-type]
        message=ChatMessage("assistant", text, tool_calls=calls),
        reasoning="",
        usage=Usage(input_tokens=40, output_tokens=5, total_tokens=45, prefilled_tokens=12),
        stats=PerfStats(10.0, 12, 20.0, 5, 100.0) if stats else None,
        model="qwen3-0.6b",
    )


# -- names and keep_alive --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "name"), [("qwen3-0.6b", "qwen3-0.6b"), ("qwen3-0.6b:latest", "qwen3-0.6b")])
def test_names_with_or_without_the_latest_tag(given: str, name: str) -> None:
    assert ow.model_name({"model": given}) == name
    assert ow.tagged(name) == "qwen3-0.6b:latest"


@pytest.mark.parametrize("given", ["qwen3-0.6b:7b", ":latest", "../models/x.rkllm", "/etc/passwd"])
def test_other_tags_and_paths_are_unknown_models(given: str) -> None:
    with pytest.raises(ModelNotFoundError):
        ow.model_name({"model": given})


def test_show_takes_model_or_the_older_name() -> None:
    assert ow.show_request({"name": "qwen3-0.6b:latest"}) == "qwen3-0.6b"
    assert ow.show_request({"model": "a", "name": "b"}) == "a"
    with pytest.raises(WireError):
        ow.show_request({})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), ("0", 0.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("-1", -1.0), ("-1m", -60.0)],
)
def test_keep_alive_as_seconds(value: Any, seconds: float | None) -> None:
    assert ow.keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5x", True, [1]])
def test_a_bad_keep_alive_is_named(value: Any) -> None:
    with pytest.raises(WireError) as err:
        ow.keep_alive_seconds(value)
    assert err.value.param == "keep_alive"


# -- chat and generate requests ----------------------------------------------------------------------------------


def test_options_map_onto_chat_options_and_runner_options_are_ignored() -> None:
    options = {
        "num_predict": 64,
        "temperature": 0.2,
        "top_k": 7,
        "top_p": 0.9,
        "repeat_penalty": 1.1,
        "stop": ["\n\n"],
        "seed": 42,
        "num_ctx": 131072,
        "num_gpu": 99,
        "mirostat": None,
        "a_future_option": 1,
    }
    req = ow.chat_request({"model": "m", "messages": USER, "options": options})
    o = req.options
    assert o.max_new_tokens == 64 and o.stop == ("\n\n",)
    assert o.sampling is not None and (o.sampling.temperature, o.sampling.top_k, o.sampling.top_p) == (0.2, 7, 0.9)
    assert o.sampling.repeat_penalty == 1.1 and o.sampling.mirostat is None
    assert req.stream and req.keep_alive is None  # Ollama streams unless told not to


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_num_predict_without_a_limit_leaves_the_models_own(num_predict: int) -> None:
    req = ow.chat_request({"model": "m", "messages": USER, "options": {"num_predict": num_predict}})
    assert req.options.max_new_tokens is None


def test_num_predict_above_the_servers_limit_is_refused() -> None:
    with pytest.raises(WireError) as err:
        ow.chat_request({"model": "m", "messages": USER, "options": {"num_predict": 10_000}}, max_tokens_limit=8192)
    assert err.value.param == "options.num_predict"


def test_a_bad_option_value_is_refused_as_the_openai_side_refuses_it() -> None:
    with pytest.raises(InvalidParameterError):
        ow.chat_request({"model": "m", "messages": USER, "options": {"temperature": -1}})


def test_format_think_and_tools() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = ow.chat_request(
        {"model": "m", "messages": USER, "format": schema, "think": "high", "tools": tools, "stream": False}
    )
    assert req.options.response_format == {"type": "json_schema", "json_schema": {"schema": schema}}
    assert req.options.enable_thinking and req.options.tool_names() == ("f",) and not req.stream
    plain = ow.chat_request({"model": "m", "messages": USER, "format": "json", "think": False})
    assert plain.options.response_format == {"type": "json_object"} and not plain.options.enable_thinking
    with pytest.raises(WireError):
        ow.chat_request({"model": "m", "messages": USER, "format": "yaml"})


def test_tool_calls_carry_objects_and_results_find_their_call() -> None:
    messages = [
        {"role": "user", "content": "weather and time?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "time", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_name": "time"},
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
    ]
    msgs = ow.chat_request({"model": "m", "messages": messages}).messages
    weather, clock = msgs[1].tool_calls
    assert weather.arguments == {"city": "Paris"} and clock.name == "time"
    assert msgs[2].tool_call_id == clock.id and msgs[3].tool_call_id == weather.id != clock.id


def test_images_are_bare_base64_on_user_messages_and_generate_prompts() -> None:
    msgs = ow.chat_request({"model": "m", "messages": [{"role": "user", "content": "?", "images": ["aGk="]}]}).messages
    assert msgs[0].images == (ImagePart(data=b"hi"),)
    req = ow.generate_request({"model": "m", "prompt": "?", "system": "s", "images": ["aGk=", "eW8="]})
    assert req.messages[-1].images == (ImagePart(data=b"hi"), ImagePart(data=b"yo"))
    with pytest.raises(WireError, match="base64") as err:
        ow.chat_request({"model": "m", "messages": [{"role": "user", "content": "?", "images": ["not base64!"]}]})
    assert err.value.param == "messages[0].images[0]"
    with pytest.raises(WireError, match="user messages only") as err:
        ow.chat_request({"model": "m", "messages": [{"role": "assistant", "content": "?", "images": ["aGk="]}]})
    assert err.value.param == "messages[0].images"


def test_unknown_fields_are_ignored_as_ollama_does_and_bad_roles_are_named() -> None:
    req = ow.chat_request({"model": "m", "messages": USER, "temperature": 1, "logprobs": False})
    assert req.options.sampling is None  # a field Ollama does not know is not a setting here either
    with pytest.raises(WireError) as err:
        ow.chat_request({"model": "m", "messages": USER, "logprobs": True})
    assert err.value.param == "logprobs"
    with pytest.raises(WireError) as err:
        ow.chat_request({"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    assert err.value.param == "messages[0].role"


def test_generate_is_a_system_prompt_and_one_turn() -> None:
    req = ow.generate_request({"model": "m:latest", "prompt": "hi", "system": "Be brief.", "keep_alive": "10m"})
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "hi")]
    assert req.model == "m" and req.keep_alive == 600.0
    assert ow.generate_request({"model": "m", "prompt": "", "keep_alive": 0}).messages == []
    for key, value in (("raw", True), ("template", "{{ .Prompt }}"), ("suffix", "end"), ("context", [1, 2])):
        with pytest.raises(WireError) as err:
            ow.generate_request({"model": "m", "prompt": "hi", key: value})
        assert err.value.param == key


def test_embed_requests() -> None:
    assert ow.embed_request({"model": "e", "input": "one"}).texts == ["one"]
    req = ow.embed_request({"model": "e:latest", "input": ["a", "b"], "truncate": False})
    assert req.texts == ["a", "b"] and not req.truncate and req.model == "e"
    assert ow.embeddings_request({"model": "e", "prompt": "a"}).texts == ["a"]
    with pytest.raises(WireError):
        ow.embed_request({"model": "e", "input": []})
    with pytest.raises(WireError):
        ow.embed_request({"model": "e", "input": "a", "dimensions": 64})


# -- responses -------------------------------------------------------------------------------------------------


def test_the_final_object_has_counts_and_nanoseconds() -> None:
    timings = ow.Timings(total=9_000_000, load=1_000_000, prompt_eval=3_000_000, eval=5_000_000)
    out = ow.chat_response(done("hello", reason="length"), "t", timings, whole=True)
    assert out["message"] == {"role": "assistant", "content": "hello"} and out["model"] == "qwen3-0.6b:latest"
    assert out["done"] and out["done_reason"] == "length"
    assert (out["prompt_eval_count"], out["eval_count"]) == (12, 5)  # the prefilled tokens, the generated ones
    assert (out["total_duration"], out["load_duration"], out["prompt_eval_duration"], out["eval_duration"]) == (
        9_000_000,
        1_000_000,
        3_000_000,
        5_000_000,
    )
    assert ow.chat_response(done(stats=False), "t", timings, whole=False)["prompt_eval_count"] == 40
    assert ow.chat_response(done(reason="abort"), "t", timings, whole=False)["done_reason"] == "stop"
    assert ow.chat_response(done(), "t", timings, whole=False)["message"]["content"] == ""


def test_tool_calls_answer_with_argument_objects() -> None:
    call = ToolCallRequest("call_1", "weather", {"city": "Paris"})
    out = ow.chat_response(done("", calls=(call,)), "t", ow.Timings(1), whole=True)
    assert out["message"]["tool_calls"] == [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    streamed = ow.chat_chunk(ToolCall("call_1", "weather", {"city": "Paris"}, "", 0), "qwen3-0.6b", "t")
    assert streamed is not None and streamed["message"]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert ow.chat_chunk(ToolCallDelta(0, "call_1", "weather", '{"ci'), "qwen3-0.6b", "t") is None


def test_chunks_for_text_and_thinking() -> None:
    text = ow.chat_chunk(TextDelta("he"), "qwen3-0.6b", "t")
    assert text == {
        "model": "qwen3-0.6b:latest",
        "created_at": "t",
        "message": {"role": "assistant", "content": "he"},
        "done": False,
    }
    thought = ow.chat_chunk(ReasoningDelta("hmm"), "qwen3-0.6b", "t")
    assert thought is not None and thought["message"]["thinking"] == "hmm"
    gen = ow.generate_chunk(TextDelta("he"), "qwen3-0.6b", "t")
    assert gen is not None and gen["response"] == "he" and not gen["done"]
    assert ow.load_response("m", "t", "unload", chat=False)["done_reason"] == "unload"


def test_tags_show_and_ps(tmp_path: Path) -> None:
    make_model(tmp_path, QWEN)
    make_model(tmp_path, EMBED)
    registry = ModelRegistry([tmp_path], platform=None)
    qwen, embed = registry.get("qwen3-0.6b"), registry.get("qwen3-embedding-0.6b")
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    tags = ow.tags_response([(qwen, when), (embed, when)])["models"]
    assert [m["model"] for m in tags] == ["qwen3-0.6b:latest", "qwen3-embedding-0.6b:latest"]
    assert tags[0]["name"] == tags[0]["model"] and tags[0]["modified_at"] == "2026-01-02T03:04:05Z"
    assert tags[0]["details"]["family"] == "qwen3" and tags[0]["details"]["quantization_level"] == "W8A8"
    assert tags[0]["size"] == qwen.file_size and len(tags[0]["digest"]) == 64
    shown = ow.show_response(qwen, when)
    assert shown["model_info"]["qwen3.context_length"] == 4096
    assert shown["capabilities"] == ["completion", "tools", "thinking"]
    assert ow.show_response(embed, when)["capabilities"] == ["embedding"]
    expires = datetime(2026, 1, 2, 3, 9, 5, tzinfo=timezone(timedelta(hours=2)))
    (ps,) = ow.ps_response([(qwen, 512.0, when, expires)])["models"]
    assert ps["expires_at"] == "2026-01-02T01:09:05Z" and ps["context_length"] == 4096
    assert ps["size"] == ps["size_vram"] == 512 * 1024 * 1024
    assert datetime.fromisoformat(ps["expires_at"]).tzinfo is not None  # what Open WebUI parses
