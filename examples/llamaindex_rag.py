"""RAG with LlamaIndex on the Rockchip NPU: index the text files in examples/data and ask questions.

Usage:
    python examples/llamaindex_rag.py ["your question" ...]

Runs on the NPU with your model when ``librkllmrt.so`` is found, else on the simulator (it
says so loudly; simulated answers echo the prompt, so you can see the retrieved context
that reached the model). See ``llamaindex_setup.py`` for the environment variables.

Embed → retrieve → rerank → answer, all on the NPU: ``RKLLMEmbedding`` indexes the files,
the 4 nearest chunks are reranked by ``RKLLMRerank`` and the best 2 reach the LLM. The three
models share one model manager that keeps them loaded together. On a board, put an embedding
and a reranker ``.rkllm`` (e.g. Qwen3-Embedding-0.6B and Qwen3-Reranker-0.6B) beside the LLM.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_index.core import Settings, VectorStoreIndex  # noqa: E402
from llamaindex_setup import DATA_DIR, UsageRecorder, describe, embed_model, load_documents, make_llm, reranker  # noqa: E402

from rkllm_core.errors import RKLLMError  # noqa: E402

QUESTIONS = [
    "How many NPU cores does the RK3588 have?",
    "Which chip does the Orange Pi 5 use?",
]


def main() -> int:
    questions = sys.argv[1:] or QUESTIONS
    llm, simulated = make_llm(rag=True, max_new_tokens=256)
    Settings.llm = llm
    Settings.embed_model = embed_model(llm)
    Settings.chunk_size = 96  # paragraph-sized chunks: the reranker picks the passages, not whole files
    recorder = UsageRecorder.install()

    documents = load_documents(DATA_DIR)
    index = VectorStoreIndex.from_documents(documents)
    print(f"indexed {len(documents)} files from {DATA_DIR}")
    query_engine = index.as_query_engine(similarity_top_k=4, node_postprocessors=[reranker(llm, 2)], streaming=True)

    try:
        for question in questions:
            print(f"\n> {question}")
            response = query_engine.query(question)
            for token in response.response_gen:  # the answer, streamed from the NPU
                print(token, end="", flush=True)
            print()
            print(
                "sources: "
                + ", ".join(
                    f"{Path(n.node.metadata.get('file_name', '?')).name} ({n.score:.2f})" for n in response.source_nodes
                )
            )
            print(f"[{describe(recorder.take())}{', simulated' if simulated else ''}]")
    except RKLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        llm.manager.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
