"""A RAG chat over examples/data with LlamaIndex's condense-plus-context chat engine, on the NPU.

Usage:
    python examples/llamaindex_chat_engine.py

Each turn prints the answer and, for every LLM call LlamaIndex made, how many prompt tokens
the NPU had to prefill and whether the conversation already in the KV cache was reused.

What KV-cache reuse can and cannot do here: the runtime keeps *one* token sequence per
loaded model; a request is cheap when it extends that sequence (only the new message is
prefilled). The condense-plus-context engine works against that in two ways:

1. From the second turn on it first asks the LLM to *condense* the chat into a standalone
   question. That is a different, one-off conversation, so it replaces the chat in the KV
   cache, and the answer call after it must rebuild (re-prefill) the whole chat.
2. It puts the retrieved context into the *system prompt*, at the start of the sequence.
   Whenever retrieval returns different text, everything after it changes and the whole
   chat is prefilled again.

With ``skip_condense=True`` (part 2) there is one LLM call per turn, and when follow-up
questions retrieve the same passages, each turn prefills only the new question. A system
prompt seen before (the first turn of a new chat) is loaded from the on-disk prompt cache.
See ``llamaindex_setup.py`` for the environment variables; without an NPU runtime this runs
on the simulator, whose answers echo the question.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_index.core import Settings, VectorStoreIndex  # noqa: E402
from llama_index.core.chat_engine import CondensePlusContextChatEngine  # noqa: E402
from llamaindex_setup import DATA_DIR, UsageRecorder, describe, embed_model, load_documents, make_llm  # noqa: E402

from rkllm_core.errors import RKLLMError  # noqa: E402

TURNS = [
    "What is the NPU of the RK3588?",
    "How many cores does the RK3588 NPU have?",
    "How many TOPS does the RK3588 NPU reach?",
]
SYSTEM_PROMPT = "You answer questions about Rockchip boards in one or two sentences."


def chat(index: VectorStoreIndex, recorder: UsageRecorder, *, skip_condense: bool) -> None:
    engine = CondensePlusContextChatEngine.from_defaults(
        index.as_retriever(similarity_top_k=2), system_prompt=SYSTEM_PROMPT, skip_condense=skip_condense
    )
    for number, question in enumerate(TURNS, 1):
        print(f"\n[turn {number}] > {question}")
        response = engine.stream_chat(question)
        for token in response.response_gen:
            print(token, end="", flush=True)
        print()
        calls = recorder.take()
        print(f"  {len(calls)} LLM call(s): {describe(calls)}")


def main() -> int:
    llm, _ = make_llm(rag=True, max_new_tokens=256)
    Settings.llm = llm
    Settings.embed_model = embed_model(llm)  # on the NPU too, on the LLM's manager
    Settings.chunk_size = 96  # paragraph-sized chunks: the context holds the passages, not whole files
    recorder = UsageRecorder.install()
    documents = load_documents(DATA_DIR)
    index = VectorStoreIndex.from_documents(documents)
    try:
        print("\n=== part 1: condense-plus-context, default settings ===")
        chat(index, recorder, skip_condense=False)
        print("\n=== part 2: the same engine with skip_condense=True ===")
        chat(index, recorder, skip_condense=True)
    except RKLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        llm.manager.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
