"""A bounded cache of encoded images: content hash → embedding, least recently used evicted by bytes.

A conversation that is rebuilt (a new request carrying the same history) sends the same images
again; with this cache the encoder runs once per distinct image. Keys are the SHA-256 of the image's
encoded bytes together with what it was encoded by (:func:`image_key`), so two encoders, or two
preprocessing settings, never share an entry.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Final

from .encoder import ImageEmbedding

__all__ = ["DEFAULT_CACHE_BYTES", "EmbeddingCache", "image_digest", "image_key"]

DEFAULT_CACHE_BYTES: Final = 64 * 1024 * 1024
"""The default budget: 64 MiB holds about twenty Qwen3-VL images (196 × 2048 × 4 floats each)."""


def image_digest(data: bytes) -> str:
    """The SHA-256 hex digest of an image's encoded bytes (its identity in caches and KV tags)."""
    return hashlib.sha256(data).hexdigest()


def image_key(digest: str, encoder: Hashable) -> tuple[str, Hashable]:
    """The cache key of an image encoded by ``encoder`` (e.g. the encoder's path and pixel spec)."""
    return (digest, encoder)


class EmbeddingCache:
    """A thread-safe LRU cache of :class:`~rkllm_core.vision.encoder.ImageEmbedding` bounded by bytes.

    An embedding larger than the whole budget is not kept. ``max_bytes=0`` disables the cache.

    Args:
        max_bytes: the most embedding bytes held at once.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, ImageEmbedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """The bytes held now."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: Hashable) -> ImageEmbedding | None:
        """The embedding under ``key`` (now the most recently used), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: Hashable, embedding: ImageEmbedding) -> None:
        """Keep ``embedding`` under ``key``, evicting the least recently used entries to stay within budget."""
        size = embedding.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            self._entries[key] = embedding
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def get_or_encode(self, key: Hashable, encode: Callable[[], ImageEmbedding]) -> ImageEmbedding:
        """The cached embedding, or ``encode()``'s result, cached.

        Two threads missing the same key at once may both encode (a miss costs one recomputation,
        never a lock held across the encoder).
        """
        found = self.get(key)
        if found is not None:
            return found
        embedding = encode()
        self.put(key, embedding)
        return embedding

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
