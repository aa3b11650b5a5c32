"""The same conversation through ChatRKLLM and through RKLLM reaches the runtime byte for byte the same.

Both adapters only translate into the core chat engine; this checks it through the
simulator's call trace (every native call with its inputs), not through the adapters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage as LIMessage  # noqa: E402
from llama_index.core.base.llms.types import MessageRole  # noqa: E402

from langchain_rkllm import ChatRKLLM  # noqa: E402
from llamaindex_rkllm import RKLLM  # noqa: E402
from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

MODELS = {
    "qwen3-0.6b": "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm",
    "gemma3-1b": "gemma-3-1b-it_w8a8.rkllm",
}
NATIVE = (
    "rkllm_set_chat_template",
    "rkllm_set_function_tools",
    "rkllm_clear_kv_cache",
    "rkllm_run",
    "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache",
)


def _inputs(sim: SimulatorControl) -> list[dict[str, Any]]:
    """The runtime inputs in the trace, without handle ids and cache file names (unique per run)."""
    out = []
    for t in sim.trace():
        if t["fn"] in NATIVE:
            t = {k: v for k, v in t.items() if k != "handle"}
            if t.get("prompt_cache"):
                t["prompt_cache"] = {"save": t["prompt_cache"]["save"]}
            if "path" in t:
                t["path"] = "<cache file>"
            out.append(t)
    return out


def _run_both(
    sim: SimulatorControl,
    sim_lib: RuntimeLibrary,
    model_dir: Path,
    model: str,
    via_langchain: Callable[[ChatRKLLM], object],
    via_llamaindex: Callable[[RKLLM], object],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    traces = []
    for adapter in ("langchain", "llamaindex"):
        sim.clear_trace()
        with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as manager:
            if adapter == "langchain":
                via_langchain(ChatRKLLM(model=model, manager=manager, temperature=0.5, max_tokens=64))
            else:
                via_llamaindex(RKLLM(model=model, manager=manager, temperature=0.5, max_new_tokens=64))
        traces.append(_inputs(sim))
    return traces[0], traces[1]


@pytest.mark.parametrize("model", list(MODELS))
def test_multi_turn_conversation_is_identical(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, model: str
) -> None:
    for filename in MODELS.values():
        make_model(model_dir, filename)
    sim.set("trace", 1)

    def lc(llm: ChatRKLLM) -> None:
        history: list[Any] = [SystemMessage("You are terse."), HumanMessage("first question")]
        history.append(llm.invoke(history))
        history.append(HumanMessage("second question"))
        llm.invoke(history)
        # an edited history (forces a rebuild with an earlier assistant turn rendered)
        llm.invoke([SystemMessage("You are terse."), HumanMessage("q"), AIMessage("an answer"), HumanMessage("next")])

    def li(llm: RKLLM) -> None:
        history = [
            LIMessage(role=MessageRole.SYSTEM, content="You are terse."),
            LIMessage(role=MessageRole.USER, content="first question"),
        ]
        history.append(llm.chat(history).message)
        history.append(LIMessage(role=MessageRole.USER, content="second question"))
        llm.chat(history)
        llm.chat(
            [
                LIMessage(role=MessageRole.SYSTEM, content="You are terse."),
                LIMessage(role=MessageRole.USER, content="q"),
                LIMessage(role=MessageRole.ASSISTANT, content="an answer"),
                LIMessage(role=MessageRole.USER, content="next"),
            ]
        )

    lc_trace, li_trace = _run_both(sim, sim_lib, model_dir, model, lc, li)
    assert [t["fn"] for t in lc_trace].count("rkllm_run") == 3
    assert lc_trace == li_trace


@pytest.mark.parametrize("method", ["complete", "stream_complete", "acomplete", "astream_complete"])
def test_a_completion_is_the_same_as_a_chat_turn(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, method: str
) -> None:
    """A LlamaIndex completion is a chat turn: system_prompt, then the prompt as the user's message."""
    make_model(model_dir, MODELS["qwen3-0.6b"])
    sim.set("trace", 1)

    def lc(llm: ChatRKLLM) -> None:
        llm.invoke([SystemMessage("You are terse."), HumanMessage("a question")])
        llm.invoke([HumanMessage("an already formatted prompt")])

    async def complete(llm: RKLLM, prompt: str, **kwargs: Any) -> None:
        if method == "complete":
            llm.complete(prompt, **kwargs)
        elif method == "stream_complete":
            list(llm.stream_complete(prompt, **kwargs))
        elif method == "acomplete":
            await llm.acomplete(prompt, **kwargs)
        else:
            [c async for c in await llm.astream_complete(prompt, **kwargs)]

    def li(llm: RKLLM) -> None:
        llm.system_prompt = "You are terse."
        asyncio.run(complete(llm, "a question"))
        asyncio.run(complete(llm, "an already formatted prompt", formatted=True))  # no system prompt

    lc_trace, li_trace = _run_both(sim, sim_lib, model_dir, "qwen3-0.6b", lc, li)
    assert [t["fn"] for t in lc_trace].count("rkllm_run") == 2
    assert lc_trace == li_trace


def test_tool_round_trip_is_identical(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path) -> None:
    make_model(model_dir, MODELS["qwen3-0.6b"])
    sim.set("trace", 1)
    tool = {
        "type": "function",
        "function": {
            "name": "magic_function",
            "description": "Applies a magic function to an input.",
            "parameters": {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]},
        },
    }

    def lc(llm: ChatRKLLM) -> None:
        bound = llm.bind_tools([tool])
        history: list[Any] = [HumanMessage("What is magic_function(3)?")]
        ai = bound.invoke(history)
        assert ai.tool_calls
        history += [ai, ToolMessage("5", tool_call_id=ai.tool_calls[0]["id"])]
        bound.invoke(history)

    def li(llm: RKLLM) -> None:
        from llama_index.core.tools import FunctionTool

        def magic_function(input: int) -> int:
            """Applies a magic function to an input."""
            return input + 2

        ft = FunctionTool.from_defaults(fn=magic_function)
        history = [LIMessage(role=MessageRole.USER, content="What is magic_function(3)?")]
        response = llm.chat_with_tools([ft], chat_history=history)
        calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
        history += [
            response.message,
            LIMessage(role=MessageRole.TOOL, content="5", additional_kwargs={"tool_call_id": calls[0].tool_id}),
        ]
        llm.chat_with_tools([ft], chat_history=history)

    lc_trace, li_trace = _run_both(sim, sim_lib, model_dir, "qwen3-0.6b", lc, li)
    assert [t["fn"] for t in lc_trace].count("rkllm_run") == 2
    # The tool schema itself comes from each framework's own converter (LlamaIndex adds the Python
    # signature to the description and "title" keys), so the declarations are compared for what the
    # model needs and everything else must be byte-identical.
    lc_tools, li_tools = _declared_tools(lc_trace), _declared_tools(li_trace)
    for tools in (lc_tools, li_tools):
        assert [(t["name"], t["parameters"]["properties"]["input"]["type"]) for t in tools] == [
            ("magic_function", "integer")
        ]
    assert _without_tools(lc_trace) == _without_tools(li_trace)


def _declared_tools(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    slot = next(t["system_prompt"] for t in trace if t["fn"] == "rkllm_set_chat_template")
    block = slot.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    return [json.loads(line)["function"] for line in block.splitlines()]


def _without_tools(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in trace:
        t = dict(t)
        if "system_prompt" in t and "<tools>" in t["system_prompt"]:
            head, rest = t["system_prompt"].split("<tools>\n", 1)
            t["system_prompt"] = head + "<tools>…" + rest.split("\n</tools>", 1)[1]
        out.append(t)
    return out
