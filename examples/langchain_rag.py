"""RAG with LangChain, all on the NPU: embed → retrieve → rerank → answer, three models in one process.

Usage:
    python examples/langchain_rag.py ["your question" ...]

The text files in ``examples/data`` are split into paragraphs, embedded with ``RKLLMEmbeddings``
into an ``InMemoryVectorStore``; for each question the 6 nearest paragraphs are reranked with
``RKLLMRerank`` and the best 2 go into the prompt of ``ChatRKLLM``. One ``ModelManager`` holds
the three models (``max_loaded=3``) so none is swapped out between the steps.

Runs on the NPU when ``librkllmrt.so`` is found, else on the simulator (it says so loudly; its
embedding model is a bag of words, its reranker scores word overlap, and its answers echo the
question; the sources show which passages reached the model). On a board, put an embedding and a
reranker ``.rkllm`` (e.g. Qwen3-Embedding-0.6B and Qwen3-Reranker-0.6B) in the model directory.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from _setup import rag_models, setup
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from langchain_rkllm import ChatRKLLM, RKLLMEmbeddings, RKLLMRerank
from rkllm_core.errors import RKLLMError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry

DATA_DIR = Path(__file__).resolve().parent / "data"
QUESTIONS = [
    "How many NPU cores does the RK3588 have?",
    "Which chip does the Orange Pi 5 use?",
]


def load_paragraphs() -> list[Document]:
    docs = []
    for path in sorted(DATA_DIR.glob("*.txt")):
        for i, para in enumerate(p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")):
            if para:
                docs.append(Document(page_content=para, metadata={"source": path.name, "paragraph": i}))
    return docs


def main() -> int:
    env = setup()
    embed_name, rerank_name = rag_models(env)
    manager = ModelManager(ModelRegistry(), library=os.environ["RKLLM_LIB_PATH"], max_loaded=3)
    embeddings = RKLLMEmbeddings(model=embed_name, manager=manager)
    reranker = RKLLMRerank(model=rerank_name, manager=manager, top_n=2)
    llm = ChatRKLLM(model=env.model, manager=manager, max_tokens=256)

    store = InMemoryVectorStore.from_documents(load_paragraphs(), embeddings)
    retriever = store.as_retriever(search_kwargs={"k": 6})

    def rerank(inputs: dict[str, object]) -> list[Document]:
        question = str(inputs["question"])
        return list(reranker.compress_documents(retriever.invoke(question), question))

    def context(docs: list[Document]) -> str:
        return "\n\n".join(f"[{d.metadata['source']}] {d.page_content}" for d in docs)

    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer from the context only, in one sentence.\n\nContext:\n{context}"),
            ("human", "{question}"),
        ]
    )
    chain = (
        RunnablePassthrough.assign(docs=RunnableLambda(rerank))
        | RunnablePassthrough.assign(context=lambda x: context(x["docs"]))
        | RunnablePassthrough.assign(answer=prompt | llm | StrOutputParser())
    )
    try:
        for question in sys.argv[1:] or QUESTIONS:
            result = chain.invoke({"question": question})
            print(f"\n> {question}\n{result['answer']}")
            print(
                "sources: "
                + ", ".join(f"{d.metadata['source']} ({d.metadata['relevance_score']:.2f})" for d in result["docs"])
            )
        # The same pipeline from async code: many questions at once, nothing blocks the event loop.
        answers = asyncio.run(chain.abatch([{"question": q} for q in QUESTIONS]))
        print(f"\nabatch: {len(answers)} answers; loaded: {sorted(e.info.name for e in manager.loaded())}")
    except RKLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        manager.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
