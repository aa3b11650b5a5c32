"""A tool-calling agent on the NPU: ChatRKLLM + tools + an agent loop (LangChain's or LangGraph's).

Usage:
    python examples/langchain_agent.py [QUESTION]

The model decides to call a tool, the agent runs it and feeds the result back, and the
model answers. On the simulator a prompt that names a tool (or its topic: "weather" for
``get_weather``) gets a tool call, and a tool result gets ``Tool result: ...``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from _setup import setup
from langchain_core.tools import tool

from langchain_rkllm import ChatRKLLM


@tool
def get_weather(location: str) -> str:
    """Get the current weather at a location (a city name)."""
    return f"It is 21 °C and sunny in {location}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def make_agent(model: ChatRKLLM, tools: list[Any]) -> Any:
    """LangChain's ``create_agent`` when ``langchain`` is installed, else LangGraph's prebuilt ReAct agent."""
    try:
        from langchain.agents import create_agent  # type: ignore[import-not-found]
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # create_react_agent is deprecated in favour of create_agent
            from langgraph.prebuilt import create_react_agent

            return create_react_agent(model, tools)
    return create_agent(model, tools)


def main() -> int:
    env = setup()
    question = sys.argv[1] if len(sys.argv) > 1 else "What's the weather like in 'Paris' today?"
    agent = make_agent(ChatRKLLM(model=env.model, temperature=0.2, max_tokens=512), [get_weather, add])
    print(f"> {question}")
    result = agent.invoke({"messages": [("human", question)]})
    for message in result["messages"][1:]:
        if getattr(message, "tool_calls", None):
            for call in message.tool_calls:
                print(f"[tool call] {call['name']}({call['args']})")
        elif message.type == "tool":
            print(f"[tool result] {message.content}")
        else:
            print(f"[answer] {message.text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
