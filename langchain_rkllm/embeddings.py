"""``RKLLMEmbeddings``: LangChain embeddings computed on the Rockchip NPU through the RKLLM runtime."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from langchain_core.embeddings import Embeddings
from langchain_core.utils import from_env
from pydantic import Field, field_validator

from rkllm_core.embed import EmbeddingEngine, EmbedOptions
from rkllm_core.errors import InvalidParameterError
from rkllm_core.params import check_text

from ._client import ModelClient

__all__ = ["RKLLMEmbeddings"]


def _optional_text(value: str | None, field: str) -> str | None:
    """``value`` if it is None or non-empty text the runtime can take (``ValueError`` otherwise)."""
    if value is None:
        return None
    check_text(value, field)
    if not value.strip():
        raise ValueError(f"{field} must be non-empty text (or None for the model's default)")
    return value


class RKLLMEmbeddings(ModelClient[EmbeddingEngine], Embeddings):
    r"""Embeddings on the Rockchip NPU (RK3588 / RK3576), in-process, through the RKLLM runtime.

    Runs an embedding model converted to ``.rkllm`` (Qwen3-Embedding) in the
    runtime's hidden-state mode, following the model's own recipe (input
    format, end token, pooling, normalisation: :mod:`rkllm_core.embed.recipes`).
    Models are found by friendly name (``qwen3-embedding-0.6b``) and loaded on
    the first call, not when the object is created, by a ``rkllm_core`` model
    manager, which can keep an embedding model and a chat model loaded together
    (``ModelManager(max_loaded=2)``). Without ``librkllmrt.so`` everything runs on
    the bundled simulator.

    Documents are embedded as they are; a query (``embed_query``) is written
    with the model's query instruction (for Qwen3-Embedding
    ``Instruct: {task}\nQuery:{text}``), so queries and documents give different
    vectors even for the same text, as the model was trained. Vectors are
    L2-normalised: the dot product is the cosine similarity.

    Setup:
        Install the package with its LangChain extra, put ``librkllmrt.so`` in
        ``/usr/lib`` (or set ``RKLLM_LIB_PATH``) and the ``.rkllm`` file in
        ``~/.local/share/rkllm/models`` or ``./models`` (or set ``RKLLM_MODEL_DIR``).
        With the model's ``tokenizer.json`` beside the file (as
        ``<file stem>.tokenizer.json``) and ``pip install tokenizers``, texts are
        sent as token ids and truncated exactly.

        ```bash
        pip install -e ".[langchain]"
        rkllm models          # lists the models found, with their friendly names and kinds
        ```

    Key init args — embedding params:
        model: str
            Friendly name, alias, file name or path of an embedding model
            (default: ``$RKLLM_EMBED_MODEL``).
        query_task: str | None
            The task written into the query instruction (default: the model's,
            "Given a web search query, retrieve relevant passages that answer the query").
        batch_size: int
            Texts per call to the runtime (the model is held for one batch at a time).
        truncate: bool
            Cut texts longer than the context (the beginning is kept, with a
            warning) instead of raising ``ContextLengthError``.

    Key init args — client params:
        manager: ModelManager | None
            The model manager to use (budget, swapping); default: the process-wide one.
        model_dir: str | None
            Look for models only in this directory (its own manager).
        library_path: str | None
            Path of ``librkllmrt.so`` (or of the simulator).
        timeout: float | None
            Seconds to wait for a busy model before ``BusyError``, per batch.

    Instantiate:
        ```python
        from langchain_rkllm import RKLLMEmbeddings

        embeddings = RKLLMEmbeddings(
            model="qwen3-embedding-0.6b",
            # query_task="Given a question, retrieve passages that answer it",
            # manager=ModelManager(max_loaded=2), model_dir="...", library_path="...",
        )
        ```

    Embed single text:
        ```python
        vector = embeddings.embed_query("What is the capital of France?")
        len(vector)
        ```

        ```python
        1024
        ```

    Embed multiple texts:
        ```python
        vectors = embeddings.embed_documents(["Paris is the capital of France.", "The NPU has 6 TOPS."])
        len(vectors), len(vectors[0])
        ```

        ```python
        (2, 1024)
        ```

    Async:
        ```python
        await embeddings.aembed_query("What is the capital of France?")
        await embeddings.aembed_documents(["Paris is the capital of France."])
        ```

        The async methods never block the event loop (the runtime runs on its own
        thread); cancelling the task aborts the text being run on the NPU and
        frees the model for the next request.

    Vector store:
        ```python
        from langchain_core.vectorstores import InMemoryVectorStore

        store = InMemoryVectorStore.from_texts(["Paris is the capital of France."], embedding=embeddings)
        store.similarity_search("capital of France", k=1)
        ```

    Errors:
        ``ModelKindError`` (a ``ValueError``): the model is not an embedding
        model (a chat model or a reranker); raised at the first call, before
        anything is loaded. ``ContextLengthError``: a text does not fit and
        ``truncate`` is False. ``InvalidParameterError``: a text is not a string
        or contains a NUL character. ``BusyError`` (a ``TimeoutError``): the model
        was not free within ``timeout``. ``ModelNotFoundError``: no model has that name.
    """

    engine_class = EmbeddingEngine

    model: str = Field(
        default_factory=from_env(
            "RKLLM_EMBED_MODEL",
            error_message=(
                "RKLLMEmbeddings needs an embedding model: pass model='qwen3-embedding-0.6b' "
                "(see `rkllm models`) or set RKLLM_EMBED_MODEL"
            ),
        )
    )
    """Friendly name (``qwen3-embedding-0.6b``), alias, file name or path of an embedding model;
    default ``$RKLLM_EMBED_MODEL``."""

    query_task: str | None = None
    """The task of the query instruction ``embed_query`` writes (``None``: the model's default task).
    Documents never get an instruction."""

    batch_size: int = Field(default=32, ge=1)
    """Most texts per call to the runtime. The model is held for one batch at a time, so other
    requests (another model's, a chat turn) get their turn between batches of a long list."""

    truncate: bool = True
    """Cut a text longer than the model's context (its beginning is kept; a warning is logged)
    instead of raising ``ContextLengthError``."""

    @field_validator("query_task")
    @classmethod
    def _check_query_task(cls, value: str | None) -> str | None:
        return _optional_text(value, "query_task")

    # -- sync ----------------------------------------------------------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents (as they are, no instruction), ``batch_size`` texts per call to the runtime.

        Blocks until every batch has run; the model is loaded on first use.

        Args:
            texts: the documents.

        Returns:
            One vector per text, in input order (an empty list for no texts).

        Raises:
            ModelKindError: the model is not an embedding model (nothing is loaded).
            InvalidParameterError: ``texts`` is one string, or an item is not valid text
                (checked for all texts before any is run).
            ContextLengthError: a text does not fit the context and ``truncate`` is False.
            BusyError: the model was not free within ``timeout``.
        """
        engine, options = self._engine(), self._options(query=False)
        vectors: list[list[float]] = []
        for batch in _batches(_check_texts(texts), self.batch_size):
            vectors.extend(engine.embed(self.model, batch, **options).vectors)
        return vectors

    def embed_query(self, text: str) -> list[float]:
        """Embed a query, written with the model's query instruction (task: ``query_task``).

        Blocks until the vector is computed; the model is loaded on first use.

        Raises:
            ModelKindError, InvalidParameterError, ContextLengthError, BusyError: as for
                :meth:`embed_documents`.
        """
        return self._engine().embed(self.model, [_check_text(text)], **self._options(query=True)).vectors[0]

    # -- async ---------------------------------------------------------------------------------------------------
    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async :meth:`embed_documents`: never blocks the event loop.

        Cancelling the task aborts the text being run on the NPU; the batches
        already embedded are discarded and the model is free for the next request.
        """
        engine, options = self._engine(), self._options(query=False)
        vectors: list[list[float]] = []
        for batch in _batches(_check_texts(texts), self.batch_size):
            vectors.extend((await engine.aembed(self.model, batch, **options)).vectors)
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        """Async :meth:`embed_query`: never blocks the event loop; cancelling aborts the run."""
        return (await self._engine().aembed(self.model, [_check_text(text)], **self._options(query=True))).vectors[0]

    def _options(self, query: bool) -> EmbedOptions:
        """The engine's options for documents, or for queries (with the query instruction of ``query_task``)."""
        task = self.query_task if query else None
        return EmbedOptions(query=query, task=task, truncate=self.truncate, timeout=self.timeout)


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidParameterError(f"text must be a string, got {type(text).__name__}")
    return check_text(text, "text")


def _check_texts(texts: Sequence[str]) -> list[str]:
    """Every text checked up front (so a bad one late in a long list fails before any batch runs)."""
    if isinstance(texts, str):
        raise InvalidParameterError("texts must be a list of strings, not one string")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidParameterError(f"texts[{i}] must be a string, got {type(text).__name__}")
        check_text(text, f"texts[{i}]")
    return items


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
