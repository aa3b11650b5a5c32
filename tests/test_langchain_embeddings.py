"""RKLLMEmbeddings and RKLLMRerank on the simulator (both ABIs).

The simulator's embedding model is a bag of words (texts sharing words are
closer) and its reranker scores the share of the query's words a document
contains, so retrieval and ranking have right and wrong answers: a constant
vector, an ignored instruction or an unsorted result fails these tests.
"""

from __future__ import annotations

import asyncio
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from pydantic import ValidationError

import rkllm_core.native.library
from langchain_rkllm import ChatRKLLM, RKLLMEmbeddings, RKLLMRerank
from rkllm_core.embed import EmbeddingEngine
from rkllm_core.embed.recipes import QWEN3_RERANKER
from rkllm_core.errors import InvalidParameterError, ModelKindError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

EMBED_FILE = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
RERANK_FILE = "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm"
CHAT_FILE = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
EMBED, RERANK, CHAT = "qwen3-embedding-0.6b", "qwen3-reranker-0.6b", "qwen3-0.6b"

DOCS = [
    Document("Rockchip NPU boards run language models locally.", metadata={"topic": "npu"}, id="npu"),
    Document("My cat sat on its warm mat by an open fire.", metadata={"topic": "cat"}, id="cat"),
    Document("Stock markets fell sharply after banks raised interest rates.", metadata={"topic": "money"}, id="money"),
    Document("Fresh bread and pastries from our bakery every morning.", metadata={"topic": "bread"}, id="bread"),
]
# Each query shares most of its words with one document (its id), and no document has a word of the
# query instruction ("Given a web search query, ..."), which would pull every query towards it.
QUERIES = {
    "npu": "which boards run language models?",
    "cat": "where my cat sat?",
    "money": "why banks raised interest rates?",
    "bread": "buy fresh bread and pastries",
}
TEXTS = [d.page_content for d in DOCS]


def dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def best(query: Sequence[float], vectors: Sequence[Sequence[float]]) -> int:
    scores = [dot(query, v) for v in vectors]
    return scores.index(max(scores))


@pytest.fixture
def models(model_dir: Path) -> Path:
    make_model(model_dir, EMBED_FILE)
    make_model(model_dir, RERANK_FILE, yes_token=QWEN3_RERANKER.yes_id, no_token=QWEN3_RERANKER.no_id)
    make_model(model_dir, CHAT_FILE)
    return model_dir


@pytest.fixture
def make_manager(models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[Callable[..., ModelManager]]:
    managers: list[ModelManager] = []

    def factory(max_loaded: int | None = 2) -> ModelManager:
        m = ModelManager(ModelRegistry([models], platform=None), library=sim_lib, max_loaded=max_loaded)
        managers.append(m)
        return m

    yield factory
    for m in managers:
        m.close()


@pytest.fixture
def manager(make_manager: Callable[..., ModelManager]) -> ModelManager:
    return make_manager()


# -- construction --------------------------------------------------------------------------------------------


def test_construction_loads_nothing(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, models: Path, tmp_path: Path
) -> None:
    before = sim.counters()
    m = ModelManager(ModelRegistry([models], platform=None), library=sim_lib, max_loaded=2)
    try:
        embeddings = RKLLMEmbeddings(model=EMBED, manager=m, query_task="Find it", batch_size=4, timeout=5)
        reranker = RKLLMRerank(model=RERANK, manager=m, top_n=2, score_threshold=0.1, instruction="Judge it")
        wrong = RKLLMEmbeddings(model=CHAT, manager=m)  # the kind is checked at first use, not here
        assert embeddings.embed_documents([]) == [] and reranker.compress_documents([], "q") == []
        after = sim.counters()
        for key in ("inits", "live_handles", "runs"):
            assert after[key] == before[key], key
        assert m.loaded() == [] and wrong.model == CHAT
        assert embeddings.embed_query("hello")  # the first call loads
        assert sim.counter("inits") == before["inits"] + 1
    finally:
        m.close()

    # A library that was never loaded stays unloaded through construction.
    fresh = tmp_path / "fresh" / "librkllmrt.so"
    fresh.parent.mkdir()
    shutil.copy(sim_lib.path, fresh)
    keys = set(rkllm_core.native.library._loaded)
    e = RKLLMEmbeddings(model=EMBED, model_dir=models, library_path=fresh)
    r = RKLLMRerank(model=RERANK, model_dir=models, library_path=fresh)
    assert set(rkllm_core.native.library._loaded) == keys
    assert e.library_path == r.library_path == str(fresh) and e.model_dir == str(models)  # Paths stored as str


def test_settings_are_checked_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = {"library_path": "/nonexistent/librkllmrt.so"}
    e = RKLLMEmbeddings(model=EMBED, **lib)
    assert e.batch_size == 32 and e.truncate is True and e.query_task is None and e.timeout is None
    r = RKLLMRerank(model=RERANK, **lib)
    assert r.top_n == 3 and r.score_threshold is None and r.instruction is None and r.truncate is True
    manager = ModelManager(ModelRegistry(["/nonexistent"]))
    for cls, name in ((RKLLMEmbeddings, EMBED), (RKLLMRerank, RERANK)):
        with pytest.raises(ValidationError, match="either manager"):
            cls(model=name, manager=manager, model_dir="/tmp")
        with pytest.raises(ValidationError, match="non-empty model name"):
            cls(model="", **lib)
        with pytest.raises(ValidationError, match="timeout"):
            cls(model=name, timeout=-1, **lib)
        with pytest.raises(ValidationError, match="timeout"):
            cls(model=name, timeout=float("nan"), **lib)
    with pytest.raises(ValidationError, match="batch_size"):
        RKLLMEmbeddings(model=EMBED, batch_size=0, **lib)
    with pytest.raises(ValidationError, match="query_task"):
        RKLLMEmbeddings(model=EMBED, query_task=" ", **lib)
    with pytest.raises(ValidationError, match="NUL"):
        RKLLMEmbeddings(model=EMBED, query_task="a\0b", **lib)
    with pytest.raises(ValidationError, match="top_n"):
        RKLLMRerank(model=RERANK, top_n=0, **lib)
    with pytest.raises(ValidationError, match="score_threshold"):
        RKLLMRerank(model=RERANK, score_threshold=1.5, **lib)
    with pytest.raises(ValidationError, match="score_threshold"):
        RKLLMRerank(model=RERANK, score_threshold=float("nan"), **lib)
    with pytest.raises(ValidationError, match="instruction"):
        RKLLMRerank(model=RERANK, instruction="", **lib)
    assert RKLLMRerank(model=RERANK, top_n=None, score_threshold=0.0, **lib).top_n is None

    monkeypatch.delenv("RKLLM_EMBED_MODEL", raising=False)
    monkeypatch.delenv("RKLLM_RERANK_MODEL", raising=False)
    with pytest.raises(ValueError, match="RKLLM_EMBED_MODEL"):
        RKLLMEmbeddings()
    with pytest.raises(ValueError, match="RKLLM_RERANK_MODEL"):
        RKLLMRerank()
    monkeypatch.setenv("RKLLM_EMBED_MODEL", "bge-m3")
    monkeypatch.setenv("RKLLM_RERANK_MODEL", "bge-reranker-v2-m3")
    assert RKLLMEmbeddings().model == "bge-m3" and RKLLMRerank().model == "bge-reranker-v2-m3"

    with pytest.warns(UserWarning, match="RKLLMEmbeddings ignores unknown argument.*dimensions"):
        RKLLMEmbeddings(model=EMBED, dimensions=512, **lib)
    with pytest.warns(UserWarning, match="RKLLMRerank ignores unknown argument.*topn"):
        RKLLMRerank(model=RERANK, topn=5, **lib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RKLLMEmbeddings(model=EMBED, max_retries=2, api_key="x", **lib)  # cross-provider: accepted, ignored
        RKLLMRerank(model=RERANK, max_retries=2, **lib)


# -- embeddings ----------------------------------------------------------------------------------------------


def test_a_vector_store_retrieves_the_document_sharing_the_query_words(manager: ModelManager) -> None:
    embeddings = RKLLMEmbeddings(model=EMBED, manager=manager)
    store = InMemoryVectorStore(embedding=embeddings)
    assert store.add_documents(DOCS) == [d.id for d in DOCS]
    for doc_id, query in QUERIES.items():
        hits = store.similarity_search_with_score(query, k=len(DOCS))
        assert [d.id for d, _ in hits][0] == doc_id, query
        scores = [s for _, s in hits]
        assert scores[0] > scores[1] + 0.05 and all(-1.0 <= s <= 1.0 + 1e-9 for s in scores)
        assert hits[0][0].metadata == {"topic": doc_id}

    async def main() -> list[str | None]:
        return [(await store.asimilarity_search(q, k=1))[0].id for q in QUERIES.values()]

    assert asyncio.run(main()) == list(QUERIES)


def test_queries_get_the_instruction_and_still_find_their_document(
    manager: ModelManager, sim: SimulatorControl
) -> None:
    embeddings = RKLLMEmbeddings(model=EMBED, manager=manager)
    docs = embeddings.embed_documents(TEXTS)
    assert len(docs) == len(TEXTS) and len({len(v) for v in docs}) == 1 and len(docs[0]) > 0
    assert all(isinstance(x, float) for v in docs for x in v)
    same = embeddings.embed_query(TEXTS[1])
    assert same != docs[1]  # the query instruction changes the vector...
    assert best(same, docs) == 1  # ...but the query is still closest to its own text
    for i, query in enumerate(QUERIES.values()):
        assert best(embeddings.embed_query(query), docs) == i, query

    # The instruction reaches the model for queries only; query_task replaces its task.
    sim.set("trace", 2)
    custom = RKLLMEmbeddings(model=EMBED, manager=manager, query_task="Find the sentence about pets")
    custom_query = custom.embed_query("cat")
    assert custom.embed_documents([TEXTS[1]]) == [docs[1]]  # documents never get an instruction
    prefilled = [t["context"] for t in sim.trace() if t["fn"] == "prefilled"]
    assert prefilled[-2:] == [
        "Instruct: Find the sentence about pets\nQuery:cat<|endoftext|>",
        f"{TEXTS[1]}<|endoftext|>",
    ]
    assert custom_query != embeddings.embed_query("cat")


def test_documents_are_embedded_in_batches_in_order(
    manager: ModelManager, sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_call = RKLLMEmbeddings(model=EMBED, manager=manager).embed_documents(TEXTS + TEXTS[:1])
    sizes: list[int] = []
    real_embed = EmbeddingEngine.embed

    def spy(self: EmbeddingEngine, model: str, texts: Sequence[str], **kw: Any) -> Any:
        sizes.append(len(texts))
        return real_embed(self, model, texts, **kw)

    monkeypatch.setattr(EmbeddingEngine, "embed", spy)
    batched = RKLLMEmbeddings(model=EMBED, manager=manager, batch_size=2).embed_documents(TEXTS + TEXTS[:1])
    assert sizes == [2, 2, 1] and batched == one_call and batched[0] == batched[4]


def test_bad_input_is_refused_before_anything_runs(manager: ModelManager, sim: SimulatorControl) -> None:
    embeddings = RKLLMEmbeddings(model=EMBED, manager=manager, batch_size=2)
    runs = sim.counter("runs")
    with pytest.raises(InvalidParameterError, match="one string"):
        embeddings.embed_documents("not a list")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"texts\[5\] must be a string"):
        embeddings.embed_documents(["a", "b", "c", "d", "e", 6])  # type: ignore[list-item]
    with pytest.raises(InvalidParameterError, match=r"texts\[3\] contains a NUL"):
        asyncio.run(embeddings.aembed_documents(["a", "b", "c", "d\0"]))
    with pytest.raises(InvalidParameterError, match="text must be a string"):
        embeddings.embed_query(None)  # type: ignore[arg-type]
    reranker = RKLLMRerank(model=RERANK, manager=manager)
    with pytest.raises(InvalidParameterError, match="not one string"):
        reranker.rerank("a document", "q")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"documents\[1\] must be a Document or a string"):
        reranker.rerank([DOCS[0], 3], "q")  # type: ignore[list-item]
    with pytest.raises(InvalidParameterError, match="query"):
        reranker.compress_documents(DOCS, None)  # type: ignore[arg-type]
    assert sim.counter("runs") == runs and manager.loaded() == []
    assert embeddings.embed_documents(["still", "serving", "fine"])


def test_async_gives_the_same_vectors_and_never_blocks_the_loop(
    manager: ModelManager, sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    embeddings = RKLLMEmbeddings(model=EMBED, manager=manager, batch_size=3)
    docs = embeddings.embed_documents(TEXTS)
    queries = [embeddings.embed_query(q) for q in QUERIES.values()]

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the async path must not call the sync engine or a thread executor")

    # Neither LangChain's default (sync in an executor) nor the blocking engine calls may be used.
    monkeypatch.setattr("langchain_core.embeddings.embeddings.run_in_executor", forbidden)
    monkeypatch.setattr(EmbeddingEngine, "embed", forbidden)
    sim.set("prefill_ms_per_token", 1)

    async def main() -> tuple[list[list[float]], list[list[float]], int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        tick = asyncio.create_task(ticker())
        try:
            got_docs = await embeddings.aembed_documents(TEXTS)
            got_queries = [await embeddings.aembed_query(q) for q in QUERIES.values()]
        finally:
            done.set()
            await tick
        return got_docs, got_queries, ticks

    got_docs, got_queries, ticks = asyncio.run(main())
    assert got_docs == docs and got_queries == queries
    assert ticks >= 10  # the loop kept running while the NPU (simulator) worked


def test_many_queries_and_a_chat_turn_share_one_manager(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    m = make_manager(max_loaded=2)
    embeddings = RKLLMEmbeddings(model=EMBED, manager=m)
    chat = ChatRKLLM(model=CHAT, manager=m, max_tokens=16)
    queries = [f"{q} ({i})" for i in range(5) for q in QUERIES.values()]
    expected = [embeddings.embed_query(q) for q in queries]
    sim.set("prefill_ms_per_token", 0.2)
    sim.set("token_delay_ms", 1)

    async def main() -> list[Any]:
        return await asyncio.wait_for(
            asyncio.gather(*(embeddings.aembed_query(q) for q in queries), chat.ainvoke("hello")), 60
        )

    *vectors, reply = asyncio.run(main())
    assert vectors == expected
    assert reply.content == "Echo: hello — ok."
    assert sim.counter("inits") == 2 and {e.info.kind for e in m.loaded()} == {"embedding", "chat"}
    assert m.waiting() == 0


def test_cancelling_a_batch_leaves_the_manager_serving(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    m = make_manager(max_loaded=2)
    embeddings = RKLLMEmbeddings(model=EMBED, manager=m, batch_size=8, timeout=10)
    texts = [f"text number {i} " + "with padding words " * 20 for i in range(24)]
    expected = embeddings.embed_documents(texts[:3])
    sim.set("prefill_ms_per_token", 1)  # about 0.1 s per text

    async def main() -> int:
        start = sim.counter("runs")
        victim = asyncio.create_task(embeddings.aembed_documents(texts))
        for _ in range(2000):  # until the first batch is under way
            if sim.counter("runs") >= start + 2:
                break
            await asyncio.sleep(0.005)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        ran = sim.counter("runs") - start
        await asyncio.sleep(0.3)
        assert sim.counter("runs") - start == ran  # nothing more runs after the cancellation...
        assert sim.counter("active_runs") == 0
        sim.set("prefill_ms_per_token", 0)
        again = await asyncio.wait_for(embeddings.aembed_documents(texts[:3]), 30)  # ...and the model is free
        assert again == expected
        return ran

    ran = asyncio.run(main())
    assert 2 <= ran < 8  # cancelled in the middle of the first batch
    assert embeddings.embed_documents(texts[:3]) == expected
    assert ChatRKLLM(model=CHAT, manager=m).invoke("hi").content == "Echo: hi — ok."
    assert m.waiting() == 0


def test_wrong_model_kinds_are_refused_before_loading(manager: ModelManager, sim: SimulatorControl) -> None:
    for name, kind in ((CHAT, "chat"), (RERANK, "reranker")):
        embeddings = RKLLMEmbeddings(model=name, manager=manager)
        with pytest.raises(ModelKindError, match=f"is a {kind} model.*only serve embedding models") as caught:
            embeddings.embed_query("x")
        assert caught.value.kind == kind and caught.value.accepted == ("embedding",)
        with pytest.raises(ModelKindError):
            embeddings.embed_documents(["x"])
        with pytest.raises(ModelKindError):
            asyncio.run(embeddings.aembed_documents(["x"]))
    for name in (EMBED, CHAT):
        reranker = RKLLMRerank(model=name, manager=manager)
        with pytest.raises(ModelKindError, match="only serve reranker models") as caught:
            reranker.compress_documents(DOCS, "cat")
        assert caught.value.accepted == ("reranker",)
        with pytest.raises(ModelKindError):
            asyncio.run(reranker.acompress_documents(DOCS, "cat"))
    assert manager.loaded() == [] and sim.counter("inits") == 0


# -- reranking -----------------------------------------------------------------------------------------------


def test_rerank_orders_by_relevance_and_copies_the_documents(manager: ModelManager) -> None:
    originals = [d.model_copy(deep=True) for d in DOCS]
    everything = RKLLMRerank(model=RERANK, manager=manager, top_n=None)
    query = "why stock markets fell after banks raised interest rates"
    ranked = everything.compress_documents(DOCS, query)
    assert [d.id for d in ranked][0] == "money" and len(ranked) == len(DOCS)
    scores = [d.metadata["relevance_score"] for d in ranked]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] > 0.5 > scores[1]
    for doc in ranked:  # the caller's documents are unchanged; the copies keep id and metadata
        original = next(d for d in DOCS if d.id == doc.id)
        assert doc is not original and doc.page_content == original.page_content
        assert doc.metadata == {**original.metadata, "relevance_score": doc.metadata["relevance_score"]}
    assert DOCS == originals and all("relevance_score" not in d.metadata for d in DOCS)

    pairs = everything.rerank(TEXTS, query)  # strings work too; (input index, score), best first
    assert pairs == [(TEXTS.index(d.page_content), d.metadata["relevance_score"]) for d in ranked]
    for doc_id, q in QUERIES.items():
        assert everything.compress_documents(DOCS, q)[0].id == doc_id, q


def test_rerank_respects_top_n_and_score_threshold(manager: ModelManager) -> None:
    query = "fresh bread from a bakery"
    scores = dict(RKLLMRerank(model=RERANK, manager=manager, top_n=None).rerank(DOCS, query))
    order = sorted(range(len(DOCS)), key=lambda i: -scores[i])

    default = RKLLMRerank(model=RERANK, manager=manager).compress_documents(DOCS, query)
    assert [d.id for d in default] == [DOCS[i].id for i in order[:3]]  # top_n=3 by default
    top1 = RKLLMRerank(model=RERANK, manager=manager, top_n=1).compress_documents(DOCS, query)
    assert [d.id for d in top1] == ["bread"]

    threshold = (scores[order[0]] + scores[order[1]]) / 2
    strict = RKLLMRerank(model=RERANK, manager=manager, top_n=None, score_threshold=threshold)
    assert [d.id for d in strict.compress_documents(DOCS, query)] == ["bread"]
    assert RKLLMRerank(model=RERANK, manager=manager, score_threshold=1.0).compress_documents(DOCS, query) == []
    lenient = RKLLMRerank(model=RERANK, manager=manager, top_n=2, score_threshold=0.0)
    assert len(lenient.compress_documents(DOCS, query)) == 2
    assert RKLLMRerank(model=RERANK, manager=manager).compress_documents([], query) == []


def test_rerank_async_gives_the_same_result_without_threads(
    manager: ModelManager, sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    reranker = RKLLMRerank(model=RERANK, manager=manager, top_n=2, instruction="Find the passage about money")
    query = "banks interest rates"
    sim.set("trace", 2)
    sync = reranker.compress_documents(DOCS, query)
    sync_pairs = reranker.rerank(DOCS, query)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the async path must not call the sync engine or a thread executor")

    monkeypatch.setattr("langchain_core.documents.compressor.run_in_executor", forbidden)
    monkeypatch.setattr(EmbeddingEngine, "rerank", forbidden)

    async def main() -> tuple[Sequence[Document], list[tuple[int, float]]]:
        return await reranker.acompress_documents(DOCS, query), await reranker.arerank(DOCS, query)

    docs, pairs = asyncio.run(main())
    assert docs == sync and pairs == sync_pairs and [d.id for d in docs][0] == "money"
    prompts = [t["context"] for t in sim.trace() if t["fn"] == "prefilled"]
    assert len(prompts) == 4 * len(DOCS)  # every document scored, sync and async, with the instruction
    assert all("<Instruct>: Find the passage about money\n<Query>: banks interest rates\n" in p for p in prompts)


def test_rerank_in_a_contextual_compression_retriever(manager: ModelManager) -> None:
    """A vector store (RKLLMEmbeddings) retrieves candidates; RKLLMRerank keeps the best."""
    store = InMemoryVectorStore(embedding=RKLLMEmbeddings(model=EMBED, manager=manager))
    store.add_documents(DOCS)
    reranker = RKLLMRerank(model=RERANK, manager=manager, top_n=1)
    retriever = ContextualCompressionRetriever(
        base_compressor=reranker, base_retriever=store.as_retriever(search_kwargs={"k": 3})
    )
    for doc_id, query in QUERIES.items():
        found = retriever.invoke(query)
        assert [d.id for d in found] == [doc_id], query
        assert 0.5 < found[0].metadata["relevance_score"] <= 1.0

    async def main() -> list[list[Document]]:
        return [await retriever.ainvoke(q) for q in QUERIES.values()]

    assert [[d.id for d in found] for found in asyncio.run(main())] == [[i] for i in QUERIES]
    assert {e.info.kind for e in manager.loaded()} == {"embedding", "reranker"}
