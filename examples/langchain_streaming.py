"""Streaming with ChatRKLLM: tokens as they are generated, usage on the last chunk, async, early stop.

Usage:
    python examples/langchain_streaming.py

Leaving a stream early (``break``) or cancelling an async task aborts the generation on the NPU.
"""

from __future__ import annotations

import asyncio

from _setup import setup
from langchain_core.messages import HumanMessage, SystemMessage

from langchain_rkllm import ChatRKLLM


async def stream_async(model: ChatRKLLM) -> None:
    print("> (async) count to 10")
    async for chunk in model.astream("count to 10"):
        print(chunk.text, end="", flush=True)
    print()


def main() -> int:
    env = setup()
    model = ChatRKLLM(model=env.model, max_tokens=256)
    messages = [SystemMessage("You are a helpful assistant."), HumanMessage("Why is the sky blue?")]

    print(f"> {messages[-1].content}")
    last = None
    for chunk in model.stream(messages):
        print(chunk.text, end="", flush=True)
        last = chunk
    print()
    assert last is not None and last.chunk_position == "last"
    usage = last.usage_metadata or {}
    meta = last.response_metadata
    print(
        f"[finish: {meta['finish_reason']}; tokens in: {usage.get('input_tokens')}, "
        f"out: {usage.get('output_tokens')}; prefilled on the NPU: {meta['prefilled_tokens']}]"
    )

    asyncio.run(stream_async(model))

    print("> count to 1000 (stopped after 5 chunks)")
    for i, chunk in enumerate(model.stream("count to 1000")):
        print(chunk.text, end="", flush=True)
        if i == 4:
            break  # closing the stream aborts the generation on the NPU
    print("\n[stopped early: generation aborted]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
