"""rkllm_core.embed: embeddings and reranking through the runtime's hidden-state and logits modes."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.embed import EmbeddingEngine
from rkllm_core.embed import engine as engine_module
from rkllm_core.embed.engine import tokenizer_path
from rkllm_core.embed.recipes import QWEN3_EMBEDDING, QWEN3_RERANKER, embedding_recipe, rerank_recipe
from rkllm_core.errors import ContextLengthError, InvalidParameterError, ModelKindError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
RERANK = "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm"
CHAT = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
SMALL_EMBED = "Qwen3-Embedding-0.6B-w8a8-ctx128-rk3588.rkllm"

DOCS = [
    "The cat sat on the warm mat by the fire.",
    "Stock markets fell sharply after the bank raised interest rates.",
    "Rockchip NPU boards run language models locally.",
]


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture
def models(model_dir: Path) -> Path:
    make_model(model_dir / "embed", EMBED)
    make_model(model_dir / "rerank", RERANK, yes_token=QWEN3_RERANKER.yes_id, no_token=QWEN3_RERANKER.no_id)
    make_model(model_dir / "chat", CHAT)
    make_model(model_dir / "small", SMALL_EMBED)
    return model_dir


@pytest.fixture
def make_manager(models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[Callable[..., ModelManager]]:
    managers: list[ModelManager] = []

    def factory(max_loaded: int | None = 3, dirs: tuple[str, ...] = ("embed", "rerank", "chat")) -> ModelManager:
        dirs = [models / d for d in dirs]
        m = ModelManager(ModelRegistry(dirs, platform=None), library=sim_lib, max_loaded=max_loaded)
        managers.append(m)
        return m

    yield factory
    for m in managers:
        m.close()


def test_vectors_are_normalised_and_shared_words_bring_texts_closer(make_manager: Callable[..., ModelManager]) -> None:
    engine = EmbeddingEngine(make_manager())
    result = engine.embed("qwen3-embedding-0.6b", [*DOCS, DOCS[0]])
    v = result.vectors
    assert len(v) == 4 and len({len(x) for x in v}) == 1 and len(v[0]) > 0
    for vector in v:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-6)
    assert v[0] == v[3]  # deterministic, no state carried between texts
    query = engine.embed("qwen3-embedding-0.6b", ["where did the cat sit?"], query=True).vectors[0]
    scores = [cos(query, d) for d in v[:3]]
    assert scores.index(max(scores)) == 0
    assert result.model == "qwen3-embedding-0.6b" and result.input_tokens > 0 and result.truncated == 0


def test_the_recipe_reaches_the_model_unwrapped(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    engine = EmbeddingEngine(make_manager())
    sim.set("trace", 2)
    engine.embed("qwen3-embedding-0.6b", ["plain document"])
    engine.embed("qwen3-embedding-0.6b", ["a question"], query=True, task="Find the answer")
    prefilled = [t["context"] for t in sim.trace() if t["fn"] == "prefilled"]
    assert prefilled[-2:] == [
        "plain document<|endoftext|>",
        "Instruct: Find the answer\nQuery:a question<|endoftext|>",
    ]


def test_query_and_document_vectors_differ_by_the_instruction(make_manager: Callable[..., ModelManager]) -> None:
    engine = EmbeddingEngine(make_manager())
    doc, other = engine.embed("qwen3-embedding-0.6b", ["cat on a mat", "stock markets fell"]).vectors
    query = engine.embed("qwen3-embedding-0.6b", ["cat on a mat"], query=True).vectors[0]
    assert doc != query and cos(doc, query) > cos(other, query) + 0.2


def test_async_gives_the_same_vectors_and_scores(make_manager: Callable[..., ModelManager]) -> None:
    engine = EmbeddingEngine(make_manager())
    sync = engine.embed("qwen3-embedding-0.6b", DOCS).vectors
    sync_scores = engine.rerank("qwen3-reranker-0.6b", "cat on the mat", DOCS).scores

    async def main() -> tuple[list[list[float]], list[float]]:
        vectors = await engine.aembed("qwen3-embedding-0.6b", DOCS)
        scores = await engine.arerank("qwen3-reranker-0.6b", "cat on the mat", DOCS)
        return vectors.vectors, scores.scores

    vectors, scores = asyncio.run(main())
    assert vectors == sync and scores == sync_scores


def test_rerank_scores_follow_relevance(make_manager: Callable[..., ModelManager], sim: SimulatorControl) -> None:
    engine = EmbeddingEngine(make_manager())
    sim.set("trace", 2)
    result = engine.rerank("qwen3-reranker-0.6b", "interest rates and stock markets", DOCS)
    s = result.scores
    assert all(0.0 <= x <= 1.0 for x in s)
    assert s[1] > 0.5 > s[0] and s[1] > s[2]
    prompt = [t["context"] for t in sim.trace() if t["fn"] == "prefilled"][-1]
    assert prompt.startswith("<|im_start|>system\nJudge whether the Document")
    assert "<Query>: interest rates and stock markets\n<Document>: Rockchip NPU" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_wrong_kinds_are_refused_before_loading(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    m = make_manager()
    engine = EmbeddingEngine(m)
    with pytest.raises(ModelKindError) as caught:
        engine.embed("qwen3-0.6b", ["x"])
    assert "is a chat model" in str(caught.value) and "ChatRKLLM" in str(caught.value)
    with pytest.raises(ModelKindError, match="is an embedding model.*RKLLMEmbeddings"):
        engine.rerank("qwen3-embedding-0.6b", "q", ["d"])
    with pytest.raises(ModelKindError, match="RKLLMRerank"):
        ChatEngine(m, prompt_cache=False).chat("qwen3-reranker-0.6b", [ChatMessage("user", "hi")])
    assert m.loaded() == [] and sim.counter("inits") == 0


def test_bad_input_is_typed_and_loses_nothing(make_manager: Callable[..., ModelManager]) -> None:
    m = make_manager()
    engine = EmbeddingEngine(m)
    with pytest.raises(InvalidParameterError, match="one string"):
        engine.embed("qwen3-embedding-0.6b", "not a list")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"texts\[1\] must be a string"):
        engine.embed("qwen3-embedding-0.6b", ["ok", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidParameterError, match=r"texts\[0\]"):
        engine.embed("qwen3-embedding-0.6b", ["bad \ud800 text"])
    with pytest.raises(InvalidParameterError, match="query"):
        engine.rerank("qwen3-reranker-0.6b", None, ["d"])  # type: ignore[arg-type]
    assert engine.embed("qwen3-embedding-0.6b", []).vectors == []
    assert len(engine.embed("qwen3-embedding-0.6b", [""]).vectors) == 1  # the end token alone
    assert engine.embed("qwen3-embedding-0.6b", ["still serving"]).vectors


def test_long_texts_are_cut_with_a_warning_or_refused(
    make_manager: Callable[..., ModelManager], caplog: pytest.LogCaptureFixture
) -> None:
    engine = EmbeddingEngine(make_manager(dirs=("small",)))
    long = "word " * 400  # far above the 128-token context of the small model
    with caplog.at_level(logging.WARNING):
        result = engine.embed("qwen3-embedding-0.6b", [long, "short text"])
    assert result.truncated == 1 and len(result.vectors) == 2
    assert "1 of 2 texts were cut" in caplog.text
    with pytest.raises(ContextLengthError):
        engine.embed("qwen3-embedding-0.6b", [long], truncate=False)
    assert engine.embed("qwen3-embedding-0.6b", ["fine"]).truncated == 0


def test_embedding_and_chat_models_stay_loaded_together(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    m = make_manager(max_loaded=2)
    engine, chat = EmbeddingEngine(m), ChatEngine(m, prompt_cache=False)
    for _ in range(3):
        engine.embed("qwen3-embedding-0.6b", DOCS)
        assert chat.chat("qwen3-0.6b", [ChatMessage("user", "hi")]).message.content == "Echo: hi — ok."
    assert sim.counter("inits") == 2  # no swapping between the two
    assert {e.info.kind for e in m.loaded()} == {"embedding", "chat"}


def test_one_model_at_a_time_swaps_like_any_other(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    m = make_manager(max_loaded=1)
    engine = EmbeddingEngine(m)
    engine.embed("qwen3-embedding-0.6b", ["a"])
    engine.rerank("qwen3-reranker-0.6b", "a", ["a"])
    engine.embed("qwen3-embedding-0.6b", ["a"])
    assert sim.counter("inits") == 3 and len(m.loaded()) == 1


def test_many_concurrent_tasks_and_cancellation(
    make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    m = make_manager()
    engine, chat = EmbeddingEngine(m), ChatEngine(m, prompt_cache=False)
    expected = engine.embed("qwen3-embedding-0.6b", DOCS).vectors
    sim.set("prefill_ms_per_token", 0.5)

    async def main() -> None:
        embeds = [engine.aembed("qwen3-embedding-0.6b", DOCS) for _ in range(8)]
        reranks = [engine.arerank("qwen3-reranker-0.6b", "cat", DOCS) for _ in range(4)]
        chats = [chat.achat("qwen3-0.6b", [ChatMessage("user", f"q{i}")]) for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*embeds, *reranks, *chats), 60)
        assert all(r.vectors == expected for r in results[:8])
        victim = asyncio.create_task(engine.aembed("qwen3-embedding-0.6b", ["long text " * 50] * 20))
        await asyncio.sleep(0.05)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        again = await asyncio.wait_for(engine.aembed("qwen3-embedding-0.6b", DOCS), 30)
        assert again.vectors == expected

    asyncio.run(main())
    assert m.waiting() == 0


def test_tokenizer_json_beside_the_model_gives_token_input(
    models: Path, make_manager: Callable[..., ModelManager], sim: SimulatorControl
) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers

    words = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "mat", "stock", "markets", "fell"]
    tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i + 100 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(models / "embed" / "tokenizer.json"))
    m = make_manager()
    assert tokenizer_path(m.resolve("qwen3-embedding-0.6b")) == models / "embed" / "tokenizer.json"
    engine = EmbeddingEngine(m)
    sim.set("trace", 2)
    v = engine.embed("qwen3-embedding-0.6b", ["the cat sat on the mat", "the cat on the mat", "stock markets fell"])
    assert cos(v.vectors[0], v.vectors[1]) > cos(v.vectors[0], v.vectors[2]) + 0.3
    assert v.input_tokens == 6 + 1 + 5 + 1 + 3 + 1  # words plus the end token, exactly
    with pytest.raises(ContextLengthError):
        engine.embed("qwen3-embedding-0.6b", ["cat " * 5000], truncate=False)


def test_recipes_come_from_the_table_and_the_registry_file(models: Path) -> None:
    (models / "embed" / "rkllm-models.toml").write_text(
        '[models."qwen3-embedding-0.6b"]\nembedding = { pooling = "mean", task = "Classify" }\n', encoding="utf-8"
    )
    make_model(models / "other", "bge-small-embed-w8a8.rkllm")
    make_model(models / "other", "acme-rerank-1b-w8a8.rkllm")
    (models / "other" / "rkllm-models.toml").write_text(
        '[models."bge-small-embed"]\nembedding = { pooling = "last", normalize = false }\n'
        '[models."acme-rerank-1b"]\nreranker = { yes_id = 1 }\n',
        encoding="utf-8",
    )
    registry = ModelRegistry([models / "embed", models / "rerank", models / "other"], platform=None)
    recipe = embedding_recipe(registry.get("qwen3-embedding-0.6b"))
    assert recipe.pooling == "mean" and recipe.task == "Classify" and recipe.suffix == QWEN3_EMBEDDING.suffix
    assert rerank_recipe(registry.get("qwen3-reranker-0.6b")) == QWEN3_RERANKER
    bge = embedding_recipe(registry.get("bge-small-embed"))
    assert bge.normalize is False and bge.query_template is None
    with pytest.raises(InvalidParameterError, match="no reranking recipe.*declare"):
        rerank_recipe(registry.get("acme-rerank-1b"))  # a partial recipe is not enough
    (models / "other" / "rkllm-models.toml").write_text(
        '[models."bge-small-embed"]\nembedding = { pooling = "max" }\n', encoding="utf-8"
    )
    registry = ModelRegistry([models / "other"], platform=None)
    assert any("pooling must be 'last' or 'mean'" in str(e) for e in registry.errors)
    with pytest.raises(InvalidParameterError, match="no embedding recipe"):
        embedding_recipe(registry.get("bge-small-embed"))


def test_a_family_without_a_recipe_is_refused_before_loading(
    models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl
) -> None:
    make_model(models / "other", "bge-small-embed-w8a8.rkllm")
    make_model(models / "other", "acme-rerank-1b-w8a8.rkllm")
    with ModelManager(ModelRegistry([models / "other"], platform=None), library=sim_lib) as m:
        engine = EmbeddingEngine(m)
        with pytest.raises(InvalidParameterError, match="no embedding recipe"):
            engine.embed("bge-small-embed", ["x"])
        with pytest.raises(InvalidParameterError, match="no reranking recipe"):
            asyncio.run(engine.arerank("acme-rerank-1b", "q", ["d"]))
        assert m.loaded() == [] and sim.counter("inits") == 0


def test_unknown_options_are_refused_like_unknown_keywords(make_manager: Callable[..., ModelManager]) -> None:
    m = make_manager()
    engine = EmbeddingEngine(m)
    with pytest.raises(TypeError, match="qeury"):
        engine.embed("qwen3-embedding-0.6b", ["x"], qeury=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="instructions"):
        asyncio.run(engine.arerank("qwen3-reranker-0.6b", "q", ["d"], instructions="x"))  # type: ignore[call-arg]
    assert m.loaded() == []


def test_async_setup_runs_off_the_loop_and_a_failure_lets_go_of_everything(
    make_manager: Callable[..., ModelManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make_manager(dirs=("small", "rerank"))
    engine = EmbeddingEngine(m)
    threads: list[int] = []
    read_tokenizer = engine_module._tokenizer_for

    def recording(info: object) -> object:
        threads.append(threading.get_ident())
        return read_tokenizer(info)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "_tokenizer_for", recording)

    async def main() -> None:
        await engine.aembed("qwen3-embedding-0.6b", DOCS)
        with pytest.raises(ContextLengthError):
            await engine.aembed("qwen3-embedding-0.6b", ["word " * 400], truncate=False)
        assert [e.leases for e in m.loaded()] == [0]
        assert (await engine.arerank("qwen3-reranker-0.6b", "cat", DOCS)).scores

    asyncio.run(main())
    assert len(threads) == 3 and threading.get_ident() not in threads
    assert all(e.leases == 0 for e in m.loaded()) and m.waiting() == 0
    with pytest.raises(ContextLengthError):
        engine.embed("qwen3-embedding-0.6b", ["word " * 400], truncate=False)
    assert engine.embed("qwen3-embedding-0.6b", DOCS).vectors  # the failed call left the handle free
