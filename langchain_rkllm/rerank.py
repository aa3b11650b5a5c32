"""``RKLLMRerank``: a LangChain document compressor that reranks on the Rockchip NPU through the RKLLM runtime."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.callbacks import Callbacks
from langchain_core.documents import Document
from langchain_core.documents.compressor import BaseDocumentCompressor
from langchain_core.utils import from_env
from pydantic import Field, field_validator

from rkllm_core.embed import EmbeddingEngine, RerankOptions
from rkllm_core.errors import InvalidParameterError

from ._client import ModelClient
from .embeddings import _optional_text

__all__ = ["RKLLMRerank"]


class RKLLMRerank(ModelClient[EmbeddingEngine], BaseDocumentCompressor):
    """Reranking on the Rockchip NPU (RK3588 / RK3576), in-process, through the RKLLM runtime.

    Scores each retrieved document for the query with a reranker model
    converted to ``.rkllm`` (Qwen3-Reranker): the model judges whether the
    document meets the query, and the score is P(yes), in [0, 1]
    (:mod:`rkllm_core.embed.recipes`). The best ``top_n`` documents scoring at
    least ``score_threshold`` are returned, best first, each a copy with
    ``metadata["relevance_score"]`` set (the caller's documents are not changed).
    The model is found by friendly name (``qwen3-reranker-0.6b``) and loaded on
    the first call, not when the object is created. Without ``librkllmrt.so``
    everything runs on the bundled simulator.

    Setup:
        As for :class:`~langchain_rkllm.RKLLMEmbeddings`: ``librkllmrt.so`` in
        ``/usr/lib`` (or ``RKLLM_LIB_PATH``), the ``.rkllm`` file in the models
        directory (or ``RKLLM_MODEL_DIR``), optionally its ``tokenizer.json``
        beside it for exact tokens.

    Key init args — reranking params:
        model: str
            Friendly name, alias, file name or path of a reranker model
            (default: ``$RKLLM_RERANK_MODEL``).
        top_n: int | None
            Most documents returned (``None``: all of them, sorted).
        score_threshold: float | None
            Drop documents scoring below this (a probability, 0 to 1).
        instruction: str | None
            The instruction the model judges by (default: the model's,
            "Given a web search query, retrieve relevant passages that answer the query").
        truncate: bool
            Cut documents longer than the context instead of raising ``ContextLengthError``.

    Key init args — client params:
        manager, model_dir, library_path, timeout: as for :class:`~langchain_rkllm.ChatRKLLM`.

    Instantiate:
        ```python
        from langchain_rkllm import RKLLMRerank

        reranker = RKLLMRerank(model="qwen3-reranker-0.6b", top_n=3)
        ```

    Rerank:
        ```python
        from langchain_core.documents import Document

        docs = [Document("Paris is the capital of France."), Document("The NPU has 6 TOPS.")]
        best = reranker.compress_documents(docs, "What is the capital of France?")
        best[0].metadata["relevance_score"]       # 0.99...
        reranker.rerank(docs, "What is the capital of France?")   # [(0, 0.99...), (1, 0.0...)]
        ```

    In a retriever:
        ```python
        from langchain_classic.retrievers import ContextualCompressionRetriever  # or langchain.retrievers

        retriever = ContextualCompressionRetriever(
            base_compressor=reranker, base_retriever=store.as_retriever(search_kwargs={"k": 20})
        )
        retriever.invoke("What is the capital of France?")
        ```

    Async:
        ``acompress_documents`` and ``arerank`` never block the event loop;
        cancelling the task aborts the document being scored on the NPU.

    Errors:
        ``ModelKindError`` (a ``ValueError``): the model is not a reranker (an
        embedding or chat model); raised at the first call, before anything is
        loaded. ``ContextLengthError``: a document does not fit and ``truncate``
        is False. ``InvalidParameterError``: the query or a document is not
        valid text. ``BusyError`` (a ``TimeoutError``): the model was not free
        within ``timeout``. ``RunError``: the model's yes/no token ids are outside
        its vocabulary (declare them in ``rkllm-models.toml``).
    """

    engine_class = EmbeddingEngine

    model: str = Field(
        default_factory=from_env(
            "RKLLM_RERANK_MODEL",
            error_message=(
                "RKLLMRerank needs a reranker model: pass model='qwen3-reranker-0.6b' "
                "(see `rkllm models`) or set RKLLM_RERANK_MODEL"
            ),
        )
    )
    """Friendly name (``qwen3-reranker-0.6b``), alias, file name or path of a reranker model;
    default ``$RKLLM_RERANK_MODEL``."""

    top_n: int | None = Field(default=3, ge=1)
    """Most documents returned, best first (``None``: every document that passes ``score_threshold``)."""

    score_threshold: float | None = None
    """Only documents scoring at least this are returned: a probability, 0 to 1 (``None``: no threshold)."""

    instruction: str | None = None
    """The instruction the model judges relevance by (``None``: the model's default)."""

    truncate: bool = True
    """Cut a document longer than the model's context (its beginning is kept; a warning is
    logged) instead of raising ``ContextLengthError``."""

    @field_validator("score_threshold")
    @classmethod
    def _check_threshold(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
            raise ValueError("score_threshold must be a probability between 0 and 1 (or None)")
        return value

    @field_validator("instruction")
    @classmethod
    def _check_instruction(cls, value: str | None) -> str | None:
        return _optional_text(value, "instruction")

    # -- scores --------------------------------------------------------------------------------------------------
    def rerank(self, documents: Sequence[str | Document], query: str) -> list[tuple[int, float]]:
        """Score ``documents`` for ``query``: ``(index in documents, score)`` pairs, best first.

        ``top_n`` and ``score_threshold`` apply; equal scores keep their input
        order. Blocks until every document is scored; the model is loaded on first use.

        Args:
            documents: the documents, as ``Document`` objects or strings.
            query: the query.

        Raises:
            ModelKindError: the model is not a reranker (nothing is loaded).
            InvalidParameterError: the query or a document is not valid text.
            ContextLengthError: a document does not fit the context and ``truncate`` is False.
            BusyError: the model was not free within ``timeout``.
        """
        result = self._engine().rerank(self.model, query, _contents(documents), **self._options())
        return self._select(result.scores)

    async def arerank(self, documents: Sequence[str | Document], query: str) -> list[tuple[int, float]]:
        """Async :meth:`rerank`: never blocks the event loop; cancelling aborts the document being scored."""
        result = await self._engine().arerank(self.model, query, _contents(documents), **self._options())
        return self._select(result.scores)

    # -- the compressor interface --------------------------------------------------------------------------------
    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """The best documents for ``query``, best first, as copies with ``metadata["relevance_score"]``.

        At most ``top_n``, none scoring below ``score_threshold``. Blocks until every
        document is scored. ``callbacks`` are accepted and not called (there is
        no LLM run to report).

        Raises:
            ModelKindError, InvalidParameterError, ContextLengthError, BusyError: as for :meth:`rerank`.
        """
        docs = list(documents)
        return [_scored(docs[i], score) for i, score in self.rerank(docs, query)]

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: never blocks the event loop; cancelling aborts the scoring."""
        docs = list(documents)
        return [_scored(docs[i], score) for i, score in await self.arerank(docs, query)]

    def _options(self) -> RerankOptions:
        return RerankOptions(instruction=self.instruction, truncate=self.truncate, timeout=self.timeout)

    def _select(self, scores: Sequence[float]) -> list[tuple[int, float]]:
        ranked = sorted(enumerate(scores), key=lambda pair: pair[1], reverse=True)  # stable: ties keep input order
        if self.score_threshold is not None:
            threshold = self.score_threshold
            ranked = [pair for pair in ranked if pair[1] >= threshold]
        return ranked if self.top_n is None else ranked[: self.top_n]


def _contents(documents: Sequence[str | Document]) -> list[str]:
    if isinstance(documents, str):
        raise InvalidParameterError("documents must be a list of documents or strings, not one string")
    out = []
    for i, doc in enumerate(documents):
        if isinstance(doc, Document):
            out.append(doc.page_content)
        elif isinstance(doc, str):
            out.append(doc)
        else:
            raise InvalidParameterError(f"documents[{i}] must be a Document or a string, got {type(doc).__name__}")
    return out


def _scored(doc: Document, score: float) -> Document:
    """A copy of ``doc`` with ``relevance_score`` added to a copy of its metadata."""
    return doc.model_copy(update={"metadata": {**doc.metadata, "relevance_score": score}})
