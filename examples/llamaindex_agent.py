"""A LlamaIndex agent on the Rockchip NPU: FunctionAgent calls Python tools, then answers.

Usage:
    python examples/llamaindex_agent.py ["your request"]

The model sees the tools' signatures (Qwen's ``<tools>`` format), answers with a
``<tool_call>`` block, LlamaIndex runs the tool and sends the result back; the follow-up
request extends the conversation in the NPU's KV cache, so only the tool result is
prefilled. Small models (0.5-1.5 B parameters) call tools reliably when the request names
what to do; use Qwen2.5/Qwen3 models for tool calling.

Without an NPU runtime this runs on the simulator, which calls a tool when the request
names it (``multiply(6, 7)`` passes 6 and 7) and answers with the tool result. See
``llamaindex_setup.py`` for the environment variables.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCallResult  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from llamaindex_setup import UsageRecorder, describe, make_llm  # noqa: E402

from rkllm_core.errors import RKLLMError  # noqa: E402

REQUEST = "What is 6 times 7? Use multiply(6, 7)."

NPU_CORES = {"rk3588": 3, "rk3588s": 3, "rk3576": 2}


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


def npu_cores(chip: str) -> str:
    """Return how many NPU cores a Rockchip chip (e.g. 'rk3588') has."""
    cores = NPU_CORES.get(chip.strip().lower())
    return f"{chip} has {cores} NPU cores" if cores else f"unknown chip {chip!r}"


async def run(request: str) -> None:
    llm, _ = make_llm(max_new_tokens=512)
    recorder = UsageRecorder.install()
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(npu_cores)],
        llm=llm,
        system_prompt="You are a helpful assistant. Use the tools for arithmetic and for chip facts.",
    )
    print(f"> {request}")
    try:
        handler = agent.run(user_msg=request)
        async for event in handler.stream_events():
            if isinstance(event, AgentStream) and event.delta:
                print(event.delta, end="", flush=True)
            elif isinstance(event, ToolCallResult):
                print(f"\ntool call: {event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}")
        result = await handler
        print(f"\nanswer: {result}")
        calls = recorder.take()
        print(f"[{len(calls)} LLM calls: {describe(calls)}]")
    finally:
        llm.manager.close()


def main() -> int:
    request = " ".join(sys.argv[1:]) or REQUEST
    try:
        asyncio.run(run(request))
    except RKLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
