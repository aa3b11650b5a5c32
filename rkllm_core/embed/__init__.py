"""Embeddings and reranking on the NPU: :class:`EmbeddingEngine` and the per-family recipes."""

from .engine import EmbeddingEngine, EmbeddingResult, EmbedOptions, RerankOptions, RerankResult
from .recipes import EmbeddingRecipe, RerankRecipe, embedding_recipe, rerank_recipe

__all__ = [
    "EmbedOptions",
    "EmbeddingEngine",
    "EmbeddingRecipe",
    "EmbeddingResult",
    "RerankOptions",
    "RerankRecipe",
    "RerankResult",
    "embedding_recipe",
    "rerank_recipe",
]
