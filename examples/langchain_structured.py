"""Structured output with ChatRKLLM: Pydantic, TypedDict and JSON-schema outputs, two methods.

Usage:
    python examples/langchain_structured.py

``method="function_calling"`` (default) binds the schema as a tool the model is told to call;
``method="json_schema"`` asks for a JSON instance of the schema in the reply text.
"""

from __future__ import annotations

from _setup import setup
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_rkllm import ChatRKLLM


class Board(BaseModel):
    """A single-board computer."""

    name: str = Field(description="The board's name")
    soc: str = Field(description="The system on chip")
    npu_tops: float = Field(description="NPU performance in TOPS")


class Answer(TypedDict):
    """An answer with a confidence."""

    answer: str
    confidence: int


def main() -> int:
    env = setup()
    model = ChatRKLLM(model=env.model, temperature=0, max_tokens=256)
    question = "Describe the 'Orange Pi 5' board: its SoC has a 6 TOPS NPU."

    board = model.with_structured_output(Board).invoke(question)
    print(f"function_calling -> {board!r}")

    board = model.with_structured_output(Board, method="json_schema").invoke(question)
    print(f"json_schema -> {board!r}")

    answer = model.with_structured_output(Answer).invoke("Is the RK3588 an 8-core SoC? Give 90 as confidence.")
    print(f"TypedDict -> {answer!r}")

    raw = model.with_structured_output(Board, include_raw=True).invoke(question)
    print(f"include_raw -> parsed={raw['parsed']!r}, tool calls in raw={len(raw['raw'].tool_calls)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
