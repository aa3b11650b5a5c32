"""A multi-turn conversation with ChatRKLLM: the KV cache carries the conversation between turns.

Usage:
    python examples/langchain_multiturn.py

Send each reply back unchanged in the history and only the new message is prefilled on the NPU:
``usage_metadata["input_tokens"]`` is the whole context, ``response_metadata["prefilled_tokens"]``
what the NPU actually processed this turn, ``input_token_details["cache_read"]`` the rest.
"""

from __future__ import annotations

from _setup import setup
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from langchain_rkllm import ChatRKLLM

QUESTIONS = [
    "Hi! I am setting up an Orange Pi 5. Which SoC does it use?",
    "How many NPU cores does that SoC have?",
    "Which models fit in 8 GB of RAM?",
    "Thanks. Summarise our conversation in one sentence.",
]


def main() -> int:
    env = setup()
    model = ChatRKLLM(model=env.model, max_tokens=256)
    history: list[BaseMessage] = [SystemMessage("You are a helpful assistant for single-board computers.")]
    for turn, question in enumerate(QUESTIONS, 1):
        history.append(HumanMessage(question))
        reply = model.invoke(history)
        history.append(reply)  # unchanged: the next turn continues the conversation in the KV cache
        usage = reply.usage_metadata or {}
        meta = reply.response_metadata
        print(f"> {question}")
        print(reply.text)
        print(
            f"[turn {turn}: input {usage.get('input_tokens')} tokens, prefilled {meta['prefilled_tokens']}, "
            f"from the KV cache {usage.get('input_token_details', {}).get('cache_read')}, "
            f"KV reused: {meta['kv_reused']}]"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
