"""The cache of encoded images: keyed by content and encoder, least recently used evicted by bytes."""

from __future__ import annotations

import array
import threading

import pytest

from rkllm_core.vision.cache import EmbeddingCache, image_digest, image_key
from rkllm_core.vision.encoder import ImageEmbedding


def emb(n_tokens: int, fill: float = 0.0) -> ImageEmbedding:
    """An embedding of ``n_tokens`` x 2 floats: 8 bytes per token."""
    return ImageEmbedding(array.array("f", [fill] * (n_tokens * 2)).tobytes(), n_tokens, 2)


def test_the_least_recently_used_goes_first_by_bytes() -> None:
    cache = EmbeddingCache(max_bytes=100)
    cache.put("a", emb(4))  # 32 bytes
    cache.put("b", emb(4))
    cache.put("c", emb(4))  # 96 held
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", emb(2))  # 112 > 100: b goes
    assert "b" not in cache and all(k in cache for k in "acd") and cache.nbytes == 80
    cache.put("e", emb(8))  # 64 more: c, then a, go
    assert [k for k in "abcde" if k in cache] == ["d", "e"] and cache.nbytes == 80


def test_an_entry_larger_than_the_budget_is_not_kept_and_replacing_counts_once() -> None:
    cache = EmbeddingCache(max_bytes=40)
    cache.put("a", emb(2))
    cache.put("big", emb(6))
    assert "big" not in cache and "a" in cache
    cache.put("a", emb(4))
    assert len(cache) == 1 and cache.nbytes == 32
    cache.put("a", emb(6))  # too big now: the old value is gone too, not kept stale
    assert len(cache) == 0 and cache.nbytes == 0
    assert EmbeddingCache(0).get_or_encode("x", lambda: emb(1)).n_tokens == 1  # a disabled cache still answers
    with pytest.raises(ValueError):
        EmbeddingCache(-1)


def test_get_or_encode_runs_the_encoder_once_per_image() -> None:
    cache = EmbeddingCache()
    runs: list[int] = []
    key = image_key(image_digest(b"png bytes"), ("enc.rknn", 448))
    for _ in range(3):
        cache.get_or_encode(key, lambda: runs.append(1) or emb(1, 0.5))
    assert len(runs) == 1 and (cache.hits, cache.misses) == (2, 1)
    other = image_key(image_digest(b"png bytes"), ("other.rknn", 448))  # same image, another encoder
    cache.get_or_encode(other, lambda: runs.append(1) or emb(1))
    assert len(runs) == 2
    assert image_digest(b"a") != image_digest(b"b") and len(image_digest(b"a")) == 64
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_threads_keep_the_byte_count_exact() -> None:
    cache = EmbeddingCache(max_bytes=8 * 50)
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        start.wait()
        for i in range(300):
            key = (n * 7 + i) % 80
            if cache.get(key) is None:
                cache.put(key, emb(1 + key % 3))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    held = [cache.get(k) for k in range(80)]
    assert cache.nbytes == sum(e.nbytes for e in held if e is not None) <= cache.max_bytes


def test_an_embedding_must_match_its_shape() -> None:
    with pytest.raises(ValueError, match="is not 2x2 float32"):
        ImageEmbedding(b"\0" * 12, 2, 2)
