"""A LangChain chain on the NPU: prompt | ChatRKLLM | StrOutputParser.

Usage:
    python examples/langchain_chain.py [QUESTION]

Runs on the simulator (and says so) when no ``librkllmrt.so`` is found.
"""

from __future__ import annotations

import sys

from _setup import setup
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_rkllm import ChatRKLLM


def main() -> int:
    env = setup()
    question = sys.argv[1] if len(sys.argv) > 1 else "What is an NPU, in one sentence?"
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise assistant for embedded developers."), ("human", "{question}")]
    )
    chain = prompt | ChatRKLLM(model=env.model, temperature=0.7, max_tokens=256) | StrOutputParser()

    print(f"> {question}")
    print(chain.invoke({"question": question}))

    print("> the same chain, streamed:")
    for piece in chain.stream({"question": question}):
        print(piece, end="", flush=True)
    print()

    answers = chain.batch([{"question": "Name a Rockchip SoC."}, {"question": "Name an RKLLM model."}])
    for answer in answers:
        print(f"batch: {answer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
