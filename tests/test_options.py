"""Request options: the frameworks' spellings, tool-choice forms and JSON mode, normalised once in the core."""

from __future__ import annotations

import math

import pytest

from rkllm_core import params
from rkllm_core.chat.messages import ChatMessage, append_instruction
from rkllm_core.chat.options import (
    SAMPLING_FIELDS,
    SETTINGS,
    ChatOptions,
    json_instruction,
    normalise_tool_choice,
    normalise_tools,
)
from rkllm_core.errors import InvalidParameterError
from rkllm_core.params import SamplingParams

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
MAGIC = {"name": "magic_function", "parameters": {"type": "object"}}


def test_every_spelling_of_a_setting_lands_in_one_field() -> None:
    for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        assert ChatOptions.from_settings({key: 7}).max_new_tokens == 7
    for key in ("enable_thinking", "thinking", "reasoning"):
        assert ChatOptions.from_settings({key: True}).enable_thinking is True
    assert ChatOptions.from_settings({"stop": "END"}).stop == ("END",)
    assert ChatOptions.from_settings({"stop": ["a", "b"]}).stop == ("a", "b")
    opts = ChatOptions.from_settings({"temperature": 0.5, "top_k": 3, "top_p": None})
    assert opts.sampling == SamplingParams(temperature=0.5, top_k=3)
    assert ChatOptions.from_settings({"temperature": None}).sampling is None  # nothing set: the model's defaults
    assert ChatOptions.from_settings({}) == ChatOptions()


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(InvalidParameterError, match="unsupported setting.*temprature"):
        ChatOptions.from_settings({"temprature": 0.5})
    with pytest.raises(InvalidParameterError, match="temperature"):
        ChatOptions.from_settings({"temperature": math.nan})
    with pytest.raises(InvalidParameterError, match="max_new_tokens"):
        ChatOptions.from_settings({"max_tokens": 0})
    with pytest.raises(InvalidParameterError, match="timeout"):
        ChatOptions.from_settings({"timeout": "soon"})
    assert {"temperature", "max_tokens", "reasoning", "response_format"} <= SETTINGS


def test_tool_choice_forms() -> None:
    names = ["get_weather", "magic_function"]
    assert normalise_tool_choice(None, names) is None
    assert normalise_tool_choice(False, names) is None
    assert normalise_tool_choice("auto", names) == "auto"
    assert normalise_tool_choice("none", names) == "none"
    assert normalise_tool_choice("any", names) == "required"
    assert normalise_tool_choice("required", names) == "required"
    assert normalise_tool_choice("magic_function", names) == "magic_function"
    assert normalise_tool_choice({"type": "function", "function": {"name": "get_weather"}}, names) == "get_weather"
    assert normalise_tool_choice({"name": "get_weather"}, names) == "get_weather"
    assert normalise_tool_choice({"type": "any"}, names) == "required"
    assert normalise_tool_choice(True, ["only"]) == "only"
    with pytest.raises(ValueError, match="exactly one tool"):
        normalise_tool_choice(True, names)
    with pytest.raises(ValueError, match="tool name"):
        normalise_tool_choice("other", names)
    with pytest.raises(ValueError, match="must name a function"):
        normalise_tool_choice({"type": "function"}, names)


def test_tools_and_choice_through_settings() -> None:
    opts = ChatOptions.from_settings({"tools": [WEATHER, MAGIC], "tool_choice": "any"})
    assert opts.tool_names() == ("get_weather", "magic_function")
    assert opts.tool_choice == "required" and opts.forces_tool_call
    assert ChatOptions.from_settings({"tools": [WEATHER], "tool_choice": "none"}).active_tools == ()
    assert ChatOptions.from_settings({"tool_choice": "auto"}).tool_choice is None  # no tools: nothing to choose
    with pytest.raises(InvalidParameterError, match="no name"):
        ChatOptions.from_settings({"tools": [{"parameters": {}}]})


def test_tools_are_canonical_json_and_refuse_nan() -> None:
    text = normalise_tools([MAGIC])
    assert text.startswith('[{"function": {"name": "magic_function"') and '"type": "function"' in text
    with pytest.raises(InvalidParameterError, match="JSON"):
        normalise_tools([{"name": "f", "parameters": {"default": math.nan}}])


def test_json_instruction_and_where_it_goes() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    text = json_instruction({"type": "json_schema", "json_schema": {"schema": schema}})
    assert text.startswith("Respond with a JSON object matching this JSON schema: {")
    assert json_instruction({"type": "json_object"}) == "Respond with a JSON object only, with no other text."
    with pytest.raises(InvalidParameterError):
        json_instruction({"type": "xml"})
    with pytest.raises(InvalidParameterError):
        ChatOptions(response_format={"type": "json_schema", "json_schema": {}})
    msgs = [ChatMessage("user", "Tell me a joke.", name="bob")]
    assert append_instruction(msgs, "X") == [ChatMessage("user", "Tell me a joke.\n\nX", name="bob")]
    after_tool = [ChatMessage("user", "q"), ChatMessage("assistant", ""), ChatMessage("tool", "r")]
    assert append_instruction(after_tool, "X")[-1] == ChatMessage("user", "X")


def test_every_sampling_setting_is_understood_and_the_adapters_names_are_among_them() -> None:
    values = {"temperature": 0.5, "top_p": 0.9, "top_k": 3, "repeat_penalty": 1.1, "frequency_penalty": 0.2}
    values |= {"presence_penalty": 0.3, "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2}
    assert set(values) == set(params.SAMPLING_FIELDS) <= SETTINGS
    assert ChatOptions.from_settings(values).sampling == SamplingParams(**values)
    assert set(SAMPLING_FIELDS) < set(params.SAMPLING_FIELDS)
    assert not any(name.startswith("mirostat") for name in SAMPLING_FIELDS)  # no adapter has such fields
