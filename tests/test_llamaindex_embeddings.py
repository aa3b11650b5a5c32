"""RKLLMEmbedding and RKLLMRerank inside LlamaIndex pipelines, on the simulator, offline.

The simulator's embedding model is a bag of words (texts sharing words are closer) and
its reranker scores P(yes) from the share of the query's words found in the document,
so which document comes first is known in advance. Every claim about loading, runs and
aborts is checked with the simulator's counters and call trace.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

import pytest_socket  # noqa: E402
from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.bridge.pydantic import ValidationError  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events import BaseEvent  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

from llamaindex_rkllm import RKLLM, RKLLMEmbedding, RKLLMRerank  # noqa: E402
from rkllm_core.embed import EmbeddingEngine  # noqa: E402
from rkllm_core.embed.recipes import QWEN3_RERANKER  # noqa: E402
from rkllm_core.errors import ContextLengthError, ModelKindError  # noqa: E402
from rkllm_core.models.manager import ModelManager, manager_for  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
RERANK = "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm"
CHAT = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
SMALL_EMBED = "Qwen3-Embedding-0.6B-w8a8-ctx128-rk3588.rkllm"
EMBED_NAME, RERANK_NAME, CHAT_NAME = "qwen3-embedding-0.6b", "qwen3-reranker-0.6b", "qwen3-0.6b"

DOCS = {
    "pi": "Orange Pi 5 boards carry a Rockchip RK3588 chip whose NPU has three cores.",
    "banana": "Bananas are yellow fruit, rich in potassium and sugar.",
    "paris": "Paris is the capital city of France and sits on the river Seine.",
    "bread": "Sourdough bread needs flour, water, salt and a starter culture.",
    "penguin": "Penguins live in the southern hemisphere and cannot fly.",
}
# Shares the words of the embedding model's query instruction, none of a question's: embedding
# similarity puts it first for every query, the reranker puts it back where it belongs.
DISTRACTOR = "Given a web search query, retrieve relevant passages that answer the query."
QUERIES = {
    "paris": "Which capital city sits on the river Seine?",
    "bread": "What does sourdough bread need besides flour?",
    "penguin": "Where do penguins live and can they fly?",
    "pi": "How many cores does the Rockchip NPU of the Orange Pi have?",
}


@pytest.fixture(autouse=True)
def _offline() -> Iterator[None]:
    """No test here may reach the network (LlamaIndex's defaults would try to download models)."""
    pytest_socket.disable_socket(allow_unix_socket=True)  # the event loop's self-pipe is a Unix socket pair
    yield
    pytest_socket.enable_socket()


@pytest.fixture
def models(model_dir: Path) -> Path:
    main = model_dir / "main"
    make_model(main, EMBED)
    make_model(main, RERANK, yes_token=QWEN3_RERANKER.yes_id, no_token=QWEN3_RERANKER.no_id)
    make_model(main, CHAT)
    make_model(model_dir / "small", SMALL_EMBED)  # apart: also named qwen3-embedding-0.6b
    return model_dir


@pytest.fixture
def make_manager(models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[Callable[..., ModelManager]]:
    managers: list[ModelManager] = []

    def factory(max_loaded: int | None = 3, directory: str = "main") -> ModelManager:
        m = ModelManager(ModelRegistry([models / directory], platform=None), library=sim_lib, max_loaded=max_loaded)
        managers.append(m)
        return m

    yield factory
    for m in managers:
        m.close()


@pytest.fixture
def manager(make_manager: Callable[..., ModelManager]) -> ModelManager:
    return make_manager()


def documents(with_distractor: bool = False) -> list[Document]:
    docs = [Document(text=text, id_=key) for key, text in DOCS.items()]
    if with_distractor:
        docs.append(Document(text=DISTRACTOR, id_="distractor"))
    return docs


def ids(nodes: list[NodeWithScore]) -> list[str]:
    return [str(n.node.ref_doc_id or n.node.node_id) for n in nodes]


def runs(sim: SimulatorControl) -> list[dict[str, Any]]:
    return [t for t in sim.trace() if t["fn"] == "rkllm_run"]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def count_calls(monkeypatch: pytest.MonkeyPatch, engine: EmbeddingEngine, name: str) -> list[int]:
    """Record the number of texts (or documents) of each call to ``engine.<name>``."""
    sizes: list[int] = []
    original = getattr(engine, name)
    position = 1 if name in ("embed", "aembed") else 2

    def spy(*args: Any, **kwargs: Any) -> Any:
        sizes.append(len(args[position]))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, name, spy)
    return sizes


def nodes_for(texts: list[str], scores: list[float] | None = None) -> list[NodeWithScore]:
    scores = scores or [0.5] * len(texts)
    return [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=s)
        for i, (t, s) in enumerate(zip(texts, scores, strict=True))
    ]


# ------------------------------------------------------------------------------ construction


def test_construction_loads_nothing(
    manager: ModelManager, models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl
) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager)
    rerank = RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=2)
    # with no manager: the shared one for the directory and library, created lazily too
    main = models / "main"
    lazy = RKLLMEmbedding(model=EMBED_NAME, model_dir=main, library_path=sim_lib.path)
    lazy_rerank = RKLLMRerank(RERANK_NAME, model_dir=main, library_path=sim_lib.path)
    assert emb.manager is manager and rerank.manager is manager
    assert lazy.model_dir == str(main) and lazy.library_path == str(sim_lib.path)
    assert lazy.manager is manager_for(str(main), str(sim_lib.path)) is lazy_rerank.manager
    assert lazy.manager.loaded() == [] and manager.loaded() == []
    assert sim.counter("inits") == 0 and sim.counter("runs") == 0
    assert emb.model_name == EMBED_NAME and emb.class_name() == "RKLLMEmbedding"
    assert rerank.class_name() == "RKLLMRerank" and (rerank.top_n, rerank.instruction) == (2, None)
    assert RKLLMRerank(model=RERANK_NAME).top_n == 3
    # LlamaIndex's serialisation round trip keeps the settings (not the manager)
    again = RKLLMEmbedding.from_dict(RKLLMEmbedding(EMBED_NAME, query_task="Find it", embed_batch_size=4).to_dict())
    assert (again.model, again.model_name, again.query_task, again.embed_batch_size) == (
        EMBED_NAME,
        EMBED_NAME,
        "Find it",
        4,
    )
    assert RKLLMRerank.from_dict(RKLLMRerank(RERANK_NAME, top_n=5).to_dict()).top_n == 5
    assert sim.counter("inits") == 0


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (RKLLMEmbedding, {"timeout": -1}),
        (RKLLMEmbedding, {"timeout": math.nan}),
        (RKLLMEmbedding, {"query_task": "bad\0task"}),
        (RKLLMEmbedding, {"model_name": "something-else"}),
        (RKLLMEmbedding, {"embed_batch_size": 0}),
        (RKLLMRerank, {"top_n": 0}),
        (RKLLMRerank, {"instruction": "bad\0instruction"}),
        (RKLLMRerank, {"timeout": -0.5}),
    ],
)
def test_bad_settings_fail_at_construction(cls: type, kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, ValidationError)):
        cls("some-model", **kwargs)


@pytest.mark.parametrize("cls", [RKLLMEmbedding, RKLLMRerank])
def test_bad_model_or_manager_fail_at_construction(cls: type) -> None:
    with pytest.raises(ValueError):
        cls("  ")
    with pytest.raises(TypeError, match="ModelManager"):
        cls("some-model", manager="not a manager")


# ------------------------------------------------------------------------------ embeddings


def test_vector_index_retrieves_the_document_sharing_words_first(manager: ModelManager, sim: SimulatorControl) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager)
    index = VectorStoreIndex.from_documents(documents(), embed_model=emb)
    retriever = index.as_retriever(similarity_top_k=3)
    for key, query in QUERIES.items():
        found = retriever.retrieve(query)
        assert len(found) == 3 and ids(found)[0] == key, (query, ids(found))
        assert found[0].score is not None and found[0].score > found[1].score  # type: ignore[operator]
    assert [e.info.name for e in manager.loaded()] == [EMBED_NAME]
    assert sim.counter("inits") == 1


def test_documents_go_as_they_are_and_queries_with_the_instruction(
    manager: ModelManager, sim: SimulatorControl
) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager, query_task="Find the passage about a city")
    sim.set("trace", 1)
    doc = emb.get_text_embedding("Paris sits on the Seine.")
    query = emb.get_query_embedding("Paris sits on the Seine.")
    assert [r["prompt"] for r in runs(sim)] == [
        "Paris sits on the Seine.<|endoftext|>",
        "Instruct: Find the passage about a city\nQuery:Paris sits on the Seine.<|endoftext|>",
    ]
    assert all(r["mode"] != 0 for r in runs(sim))  # hidden-state runs, not generation
    assert doc != query and cosine(doc, query) > 0.3
    assert math.isclose(math.fsum(x * x for x in doc), 1.0, rel_tol=1e-6)  # the recipe's L2 normalisation
    default = RKLLMEmbedding(EMBED_NAME, manager=manager).get_query_embedding("Paris sits on the Seine.")
    assert default != query  # the recipe's own task otherwise
    assert runs(sim)[-1]["prompt"].startswith("Instruct: Given a web search query")


def test_one_core_call_per_batch(manager: ModelManager, monkeypatch: pytest.MonkeyPatch, sim: SimulatorControl) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager, embed_batch_size=2)
    sizes = count_calls(monkeypatch, emb.engine, "embed")
    texts = list(DOCS.values())
    vectors = emb.get_text_embedding_batch(texts)
    assert sizes == [2, 2, 1] and len(vectors) == 5
    assert sim.counter("runs") == 5 and sim.counter("inits") == 1
    assert vectors == [emb.get_text_embedding(t) for t in texts]  # batching changes nothing


def test_truncate_setting_reaches_the_engine(
    make_manager: Callable[..., ModelManager], caplog: pytest.LogCaptureFixture
) -> None:
    manager = make_manager(directory="small")
    assert manager.resolve(EMBED_NAME).context_size == 128
    long = "word " * 400  # far above the 128-token context of the small model
    with caplog.at_level(logging.WARNING):
        vector = RKLLMEmbedding(EMBED_NAME, manager=manager).get_text_embedding(long)
    assert len(vector) > 0 and "were cut" in caplog.text
    strict = RKLLMEmbedding(EMBED_NAME, manager=manager, truncate=False)
    with pytest.raises(ContextLengthError):
        strict.get_text_embedding(long)
    assert strict.get_text_embedding("short enough")


async def test_async_embeddings_match_sync(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch, sim: SimulatorControl
) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager, embed_batch_size=2)
    texts = list(DOCS.values())
    sync_batch = emb.get_text_embedding_batch(texts)
    sync_query = emb.get_query_embedding(QUERIES["paris"])
    sync_text = emb.get_text_embedding(texts[0])
    sizes = count_calls(monkeypatch, emb.engine, "aembed")
    monkeypatch.setattr(emb.engine, "embed", None)  # the async path must not fall back on the sync one
    assert await emb.aget_text_embedding_batch(texts) == sync_batch
    assert sorted(sizes) == [1, 2, 2]  # one async call per batch
    assert await emb.aget_query_embedding(QUERIES["paris"]) == sync_query
    assert await emb.aget_text_embedding(texts[0]) == sync_text
    assert sim.counter("inits") == 1


async def test_async_embedding_never_blocks_the_loop(manager: ModelManager, sim: SimulatorControl) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager)
    await emb.aget_text_embedding("load the model first")
    sim.set("prefill_ms_per_token", 2)  # ~10 tokens a text: ~200 ms for the batch
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    start = loop.time()
    await emb.aget_text_embedding_batch(["some words here and there"] * 10)
    elapsed = loop.time() - start
    task.cancel()
    assert elapsed > 0.1
    assert ticks >= elapsed / 0.005 / 3  # the loop kept turning while the NPU worked


async def test_cancelling_a_batch_embedding_leaves_the_manager_serving(
    manager: ModelManager, sim: SimulatorControl
) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager, embed_batch_size=4)
    expected = emb.get_text_embedding_batch(list(DOCS.values()))
    sim.set("prefill_ms_per_token", 1)
    victim = asyncio.create_task(emb.aget_text_embedding_batch(["long text " * 50] * 20))
    await asyncio.sleep(0.05)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    for _ in range(500):  # the abort is sent from the core's executor: it may land just after
        if sim.counter("aborts"):
            break
        await asyncio.sleep(0.01)
    assert sim.counter("aborts") == 1  # the text being run was aborted on the NPU
    assert sim.counter("runs") < 5 + 20  # and the rest never ran
    sim.set("prefill_ms_per_token", 0)
    again = await asyncio.wait_for(emb.aget_text_embedding_batch(list(DOCS.values())), 30)
    assert again == expected and manager.waiting() == 0
    assert [e.info.name for e in manager.loaded()] == [EMBED_NAME] and sim.counter("inits") == 1


# ------------------------------------------------------------------------------ reranking


def test_rerank_orders_by_relevance_with_new_scores(manager: ModelManager, sim: SimulatorControl) -> None:
    texts = list(DOCS.values())
    # retrieval scores that say the opposite of relevance
    given = nodes_for(texts, [0.9, 0.8, 0.1, 0.7, 0.6])
    rerank = RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=3)
    out = rerank.postprocess_nodes(given, query_str=QUERIES["paris"])
    assert len(out) == 3 and out[0].node.node_id == "n2"  # the Paris text
    scores = [n.score for n in out]
    assert all(s is not None and 0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert scores[0] > 0.9 > 0.1 > scores[1]  # type: ignore[operator]
    direct = EmbeddingEngine(manager).rerank(RERANK_NAME, QUERIES["paris"], texts).scores
    assert scores == sorted(direct, reverse=True)[:3]  # the reranker's P(relevant), nothing else
    assert [n.score for n in given] == [0.9, 0.8, 0.1, 0.7, 0.6]  # the input is left as it was
    assert out[0].node is given[2].node
    # top_n above the node count returns them all; no nodes costs nothing
    assert len(RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=10).postprocess_nodes(given, query_str="x")) == 5
    runs_before = sim.counter("runs")
    assert rerank.postprocess_nodes([], query_str="x") == []
    assert sim.counter("runs") == runs_before


def test_rerank_reads_content_with_embed_metadata_and_the_instruction(
    manager: ModelManager, sim: SimulatorControl
) -> None:
    node = TextNode(text="Unrelated words only.", metadata={"topic": "capital city river Seine"}, id_="m")
    hidden = TextNode(
        text="Unrelated words only.",
        metadata={"topic": "capital city river Seine"},
        excluded_embed_metadata_keys=["topic"],
        id_="h",
    )
    rerank = RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=2, instruction="Judge geography")
    sim.set("trace", 1)
    out = rerank.postprocess_nodes([NodeWithScore(node=hidden), NodeWithScore(node=node)], query_str="capital city")
    assert [n.node.node_id for n in out] == ["m", "h"]
    assert out[0].score > 0.5 > out[1].score  # type: ignore[operator]
    prompts = [r["prompt"] for r in runs(sim)]
    assert len(prompts) == 2 and all("<Instruct>: Judge geography\n<Query>: capital city\n" in p for p in prompts)
    assert "<Document>: Unrelated words only.<|im_end|>" in prompts[0]
    assert "<Document>: topic: capital city river Seine\n\nUnrelated words only.<|im_end|>" in prompts[1]


def test_rerank_needs_a_query_and_dispatches_its_events(manager: ModelManager, sim: SimulatorControl) -> None:
    debug = LlamaDebugHandler()
    rerank = RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=2, callback_manager=CallbackManager([debug]))
    with pytest.raises(ValueError, match="query"):
        rerank.postprocess_nodes(nodes_for(["a"]))
    assert sim.counter("inits") == 0

    seen: list[BaseEvent] = []

    class Collect(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, ReRankStartEvent | ReRankEndEvent):
                seen.append(event)

    root = get_dispatcher()
    handler = Collect()
    root.add_event_handler(handler)
    try:
        out = rerank.postprocess_nodes(nodes_for(list(DOCS.values())), query_str=QUERIES["bread"])
    finally:
        root.event_handlers.remove(handler)
    start, end = (
        [e for e in seen if isinstance(e, ReRankStartEvent)],
        [e for e in seen if isinstance(e, ReRankEndEvent)],
    )
    assert len(start) == 1 and start[0].model_name == RERANK_NAME and start[0].top_n == 2
    assert start[0].query is not None and len(start[0].nodes) == 5
    assert len(end) == 1 and [n.node.node_id for n in end[0].nodes] == [n.node.node_id for n in out]
    (pair,) = debug.get_event_pairs(CBEventType.RERANKING)
    assert pair[1].payload is not None and len(pair[1].payload["nodes"]) == 2


async def test_async_rerank_matches_sync(manager: ModelManager, monkeypatch: pytest.MonkeyPatch) -> None:
    rerank = RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=3)
    given = nodes_for(list(DOCS.values()))
    sync = rerank.postprocess_nodes(given, query_str=QUERIES["penguin"])
    monkeypatch.setattr(rerank.engine, "rerank", None)  # the async path must not use the sync one
    sizes = count_calls(monkeypatch, rerank.engine, "arerank")
    out = await rerank.apostprocess_nodes(given, query_str=QUERIES["penguin"])
    assert sizes == [5]
    assert [(n.node.node_id, n.score) for n in out] == [(n.node.node_id, n.score) for n in sync]
    assert out[0].node.node_id == "n4"  # the penguin text
    with pytest.raises(ValueError, match="query"):
        await rerank.apostprocess_nodes(given)


@pytest.mark.parametrize("colour", ["sync", "async"])
async def test_rerank_events_for_no_nodes_and_for_a_failure(
    manager: ModelManager, sim: SimulatorControl, colour: str
) -> None:
    debug = LlamaDebugHandler()
    seen: list[str] = []

    class Collect(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, ReRankStartEvent | ReRankEndEvent):
                seen.append(type(event).__name__)

    async def run(rerank: RKLLMRerank, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        if colour == "sync":
            return rerank.postprocess_nodes(nodes, query_str="q")
        return await rerank.apostprocess_nodes(nodes, query_str="q")

    root = get_dispatcher()
    handler = Collect()
    root.add_event_handler(handler)
    try:
        rerank = RKLLMRerank(model=RERANK_NAME, manager=manager, callback_manager=CallbackManager([debug]))
        assert await run(rerank, []) == []
        assert seen == ["ReRankStartEvent", "ReRankEndEvent"]
        assert debug.get_event_pairs(CBEventType.RERANKING) == [] and sim.counter("inits") == 0  # nothing to score

        seen.clear()
        strict = RKLLMRerank(
            model=RERANK_NAME, manager=manager, truncate=False, callback_manager=CallbackManager([debug])
        )
        with pytest.raises(ContextLengthError) as caught:
            await run(strict, nodes_for(["word " * 20_000]))
    finally:
        root.event_handlers.remove(handler)
    assert seen == ["ReRankStartEvent"]  # a failed reranking has no end event
    (pair,) = debug.get_event_pairs(CBEventType.RERANKING)
    assert pair[1].payload == {EventPayload.EXCEPTION: caught.value}  # the callback event ends with the error


# ------------------------------------------------------------------------------ the whole pipeline


def test_query_engine_answers_from_the_reranked_nodes_in_order(manager: ModelManager, sim: SimulatorControl) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager)
    index = VectorStoreIndex.from_documents(documents(with_distractor=True), embed_model=emb)
    question = QUERIES["paris"]
    retrieved = index.as_retriever(similarity_top_k=6).retrieve(question)
    assert ids(retrieved)[:2] == ["distractor", "paris"]  # embeddings alone put the distractor first
    engine = index.as_query_engine(
        llm=RKLLM(CHAT_NAME, manager=manager),
        similarity_top_k=6,
        node_postprocessors=[RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=2)],
    )
    sim.set("trace", 1)
    response = engine.query(question)
    sources = response.source_nodes
    assert ids(sources)[0] == "paris" and len(sources) == 2
    scores = [n.score for n in sources]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)  # type: ignore[operator,type-var]
    assert scores[0] > 0.9  # type: ignore[operator]
    # The simulator echoes its prompt: LlamaIndex's QA prompt with the reranked context, best first.
    assert str(response).startswith("Echo: Context information is below.")
    (chat_prompt,) = [r["prompt"] for r in runs(sim) if "Context information is below." in r["prompt"]]
    first, second = (chat_prompt.index(n.node.get_content()) for n in sources)
    assert first < second
    for key in set(DOCS) - set(ids(sources)):
        assert DOCS[key] not in chat_prompt  # the nodes the reranker dropped never reach the LLM
    assert f"Query: {question}" in chat_prompt
    assert {e.info.kind for e in manager.loaded()} == {"embedding", "reranker", "chat"}


async def test_async_pipeline_matches_sync(manager: ModelManager) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager)
    index = await asyncio.to_thread(VectorStoreIndex.from_documents, documents(with_distractor=True), embed_model=emb)
    async_index = VectorStoreIndex(nodes=[], embed_model=emb, use_async=True)
    await async_index.ainsert_nodes([TextNode(text=t, id_=k) for k, t in {**DOCS, "distractor": DISTRACTOR}.items()])
    retriever = index.as_retriever(similarity_top_k=6)
    for question in QUERIES.values():
        sync = await asyncio.to_thread(retriever.retrieve, question)
        got = await retriever.aretrieve(question)
        assert [(n.node.node_id, n.score) for n in got] == [(n.node.node_id, n.score) for n in sync]
        from_async_index = await async_index.as_retriever(similarity_top_k=6).aretrieve(question)
        assert [n.score for n in from_async_index] == [n.score for n in sync]
    engine = index.as_query_engine(
        llm=RKLLM(CHAT_NAME, manager=manager),
        similarity_top_k=6,
        node_postprocessors=[RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=2)],
    )
    sync_response = await asyncio.to_thread(engine.query, QUERIES["bread"])
    response = await engine.aquery(QUERIES["bread"])
    assert str(response) == str(sync_response) and str(response).startswith("Echo: Context information is below.")
    assert [(n.node.node_id, n.score) for n in response.source_nodes] == [
        (n.node.node_id, n.score) for n in sync_response.source_nodes
    ]
    assert ids(response.source_nodes)[0] == "bread"


async def test_concurrent_async_queries_share_one_manager(manager: ModelManager, sim: SimulatorControl) -> None:
    emb = RKLLMEmbedding(EMBED_NAME, manager=manager)
    index = VectorStoreIndex(nodes=[], embed_model=emb, use_async=True)
    await index.ainsert_nodes([TextNode(text=t, id_=k) for k, t in {**DOCS, "distractor": DISTRACTOR}.items()])
    engine = index.as_query_engine(
        llm=RKLLM(CHAT_NAME, manager=manager),
        similarity_top_k=6,
        node_postprocessors=[RKLLMRerank(model=RERANK_NAME, manager=manager, top_n=2)],
    )
    sim.set("prefill_ms_per_token", 0.05)
    keys = list(QUERIES) * 2
    responses = await asyncio.wait_for(asyncio.gather(*(engine.aquery(QUERIES[k]) for k in keys)), 120)
    for key, response in zip(keys, responses, strict=True):
        assert ids(response.source_nodes)[0] == key
        assert str(response).startswith("Echo: Context information is below.")
        assert DOCS[key] in str(response)
    assert sim.counter("inits") == 3  # all three stayed loaded: no swapping
    assert {e.info.kind for e in manager.loaded()} == {"embedding", "reranker", "chat"}
    assert manager.waiting() == 0


# ------------------------------------------------------------------------------ wrong model kinds


async def test_wrong_model_kinds_are_refused_before_loading(manager: ModelManager, sim: SimulatorControl) -> None:
    chat_as_embedding = RKLLMEmbedding(CHAT_NAME, manager=manager)
    with pytest.raises(ModelKindError, match="is a chat model") as caught:
        chat_as_embedding.get_query_embedding("q")
    assert caught.value.kind == "chat" and caught.value.accepted == ("embedding",)
    with pytest.raises(ModelKindError):
        chat_as_embedding.get_text_embedding_batch(["a", "b"])
    with pytest.raises(ModelKindError):
        await chat_as_embedding.aget_text_embedding_batch(["a", "b"])
    with pytest.raises(ModelKindError):
        await asyncio.to_thread(VectorStoreIndex.from_documents, documents(), embed_model=chat_as_embedding)

    embedding_as_rerank = RKLLMRerank(model=EMBED_NAME, manager=manager)
    with pytest.raises(ModelKindError, match="is an embedding model") as caught:
        embedding_as_rerank.postprocess_nodes(nodes_for(["a"]), query_bundle=QueryBundle("q"))
    assert caught.value.kind == "embedding" and caught.value.accepted == ("reranker",)
    with pytest.raises(ModelKindError):
        await embedding_as_rerank.apostprocess_nodes(nodes_for(["a"]), query_str="q")
    with pytest.raises(ModelKindError):
        RKLLMRerank(model=CHAT_NAME, manager=manager).postprocess_nodes(nodes_for(["a"]), query_str="q")
    assert manager.loaded() == [] and sim.counter("inits") == 0
