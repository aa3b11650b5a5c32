"""Board tests of embeddings and reranking against vectors and scores made with the original models.

Skipped (never faked) without a real runtime and the files. On a board, with a JSON reference made on
any machine with the original Hugging Face models::

    {"embedding": {"documents": {"text": [floats...], ...}, "queries": {"text": [floats...], ...},
                   "task": "optional query task"},
     "rerank": {"query": "...", "documents": {"text": score, ...}, "instruction": "optional"}}

    RKLLM_LIB_PATH=/usr/lib/librkllmrt.so \
    RKLLM_TEST_EMBED_MODEL=~/models/Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm \
    RKLLM_TEST_RERANK_MODEL=~/models/Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm \
    RKLLM_TEST_EMBED_REFERENCE=~/reference.json \
        python -m pytest tests/test_board_embed.py -v

Each vector must have cosine similarity >= 0.99 with the reference (quantisation costs a little);
each reranker score must be within 0.05 of the reference and keep its order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.embed import EmbeddingEngine
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import load_library

LIB = os.environ.get("RKLLM_LIB_PATH")
EMBED = os.environ.get("RKLLM_TEST_EMBED_MODEL")
RERANK = os.environ.get("RKLLM_TEST_RERANK_MODEL")
REFERENCE = os.environ.get("RKLLM_TEST_EMBED_REFERENCE")


def _real_library() -> bool:
    if not LIB or not REFERENCE:
        return False
    try:
        return not load_library(LIB).is_simulator
    except Exception:
        return False


pytestmark = [
    pytest.mark.board,
    pytest.mark.skipif(
        not _real_library(), reason="needs RKLLM_LIB_PATH (a real runtime) and RKLLM_TEST_EMBED_REFERENCE"
    ),
]


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    assert REFERENCE is not None
    data: dict[str, Any] = json.loads(Path(REFERENCE).expanduser().read_text(encoding="utf-8"))
    return data


def _engine_for(model: str | None) -> Iterator[tuple[EmbeddingEngine, str]]:
    if not model:
        pytest.skip("the model for this test is not set")
    path = Path(model).expanduser().resolve()
    manager = ModelManager(ModelRegistry([path.parent]), library=LIB)
    try:
        yield EmbeddingEngine(manager), manager.resolve(str(path)).name
    finally:
        manager.close()


@pytest.fixture(scope="module")
def embedder() -> Iterator[tuple[EmbeddingEngine, str]]:
    yield from _engine_for(EMBED)


@pytest.fixture(scope="module")
def reranker() -> Iterator[tuple[EmbeddingEngine, str]]:
    yield from _engine_for(RERANK)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b)))


def test_embeddings_match_the_original_model(embedder: tuple[EmbeddingEngine, str], reference: dict[str, Any]) -> None:
    ref = reference.get("embedding")
    if not ref:
        pytest.skip("the reference has no embedding section")
    engine, name = embedder
    for query, table in ((False, ref.get("documents", {})), (True, ref.get("queries", {}))):
        texts = list(table)
        got = engine.embed(name, texts, query=query, task=ref.get("task")).vectors
        for text, vector in zip(texts, got, strict=True):
            assert _cosine(vector, table[text]) >= 0.99, text


def test_rerank_scores_match_the_original_model(
    reranker: tuple[EmbeddingEngine, str], reference: dict[str, Any]
) -> None:
    ref = reference.get("rerank")
    if not ref:
        pytest.skip("the reference has no rerank section")
    engine, name = reranker
    docs = list(ref["documents"])
    got = engine.rerank(name, ref["query"], docs, instruction=ref.get("instruction")).scores
    for doc, score in zip(docs, got, strict=True):
        assert abs(score - ref["documents"][doc]) <= 0.05, doc
    expected_order = sorted(range(len(docs)), key=lambda i: -ref["documents"][docs[i]])
    assert sorted(range(len(docs)), key=lambda i: -got[i]) == expected_order
