"""``RKLLMEmbeddings``: LangChain embeddings computed on the Rockchip NPU through the RKLLM runtime."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Self

from langchain_core.embeddings import Embeddings
from langchain_core.utils import from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from rkllm_core.embed import EmbeddingEngine
from rkllm_core.errors import InvalidParameterError
from rkllm_core.models.manager import ModelManager, manager_for
from rkllm_core.params import check_text

__all__ = ["RKLLMEmbeddings"]

# Cross-provider init arguments that do not apply to an in-process runtime (no service, no key, nothing to retry).
_IGNORED_INIT_ARGS = frozenset({"max_retries", "api_key"})


class _EngineClient(BaseModel):
    """The settings every class built on :class:`~rkllm_core.embed.EmbeddingEngine` shares.

    Where models are found (``manager`` or ``model_dir``/``library_path``) and
    how long to wait for one (``timeout``). Constructing only checks the
    settings: nothing is loaded or read from disk until the first call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    """The model's friendly name, alias, file name or path (each subclass gives its default)."""

    timeout: float | None = None
    """Seconds to wait for the model (its turn on the handle, room to load it) in each call to the
    runtime before ``BusyError``; ``None`` waits as long as it takes."""

    model_dir: str | None = None
    """Look for models in this directory only (a manager of its own, shared by every
    instance with the same ``model_dir``/``library_path``). Default: the standard directories."""

    library_path: str | None = None
    """Path of ``librkllmrt.so`` or of the simulator (default: ``$RKLLM_LIB_PATH``, then the usual places)."""

    manager: ModelManager | None = Field(default=None, exclude=True)
    """The ``rkllm_core`` model manager to load models with (budget, swapping); instances
    on one manager, chat models included, share its loaded models. Default: the process-wide
    manager (or the one for ``model_dir``/``library_path``). Not serialised."""

    _core_engine: EmbeddingEngine | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown_arguments(cls, values: Any) -> Any:
        if isinstance(values, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(k for k in values if k not in known and k not in _IGNORED_INIT_ARGS)
            if unknown:
                warnings.warn(
                    f"{cls.__name__} ignores unknown argument(s): {', '.join(unknown)}", UserWarning, stacklevel=2
                )
        return values

    @field_validator("model_dir", "library_path", mode="before")
    @classmethod
    def _fspath(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: float | None) -> float | None:
        if value is not None and (math.isnan(value) or value < 0):
            raise ValueError("timeout must be a number of seconds, at least 0 (or None to wait as long as it takes)")
        return value

    @model_validator(mode="after")
    def _check_client(self) -> Self:
        # Pure-Python checks only: nothing is loaded or read from disk here.
        if self.manager is not None and (self.model_dir is not None or self.library_path is not None):
            raise ValueError("pass either manager= or model_dir=/library_path=, not both (the manager has its own)")
        if not self.model:
            raise ValueError("model must be a non-empty model name")
        return self

    def _engine(self) -> EmbeddingEngine:
        """The embedding engine on this instance's manager (nothing is loaded until a request)."""
        if self._core_engine is None:
            self._core_engine = EmbeddingEngine(self.manager or manager_for(self.model_dir, self.library_path))
        return self._core_engine


def _optional_text(value: str | None, field: str) -> str | None:
    """``value`` if it is None or non-empty text the runtime can take (``ValueError`` otherwise)."""
    if value is None:
        return None
    check_text(value, field)
    if not value.strip():
        raise ValueError(f"{field} must be non-empty text (or None for the model's default)")
    return value


class RKLLMEmbeddings(_EngineClient, Embeddings):
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
        engine = self._engine()
        vectors: list[list[float]] = []
        for batch in _batches(_check_texts(texts), self.batch_size):
            vectors.extend(engine.embed(self.model, batch, truncate=self.truncate, timeout=self.timeout).vectors)
        return vectors

    def embed_query(self, text: str) -> list[float]:
        """Embed a query, written with the model's query instruction (task: ``query_task``).

        Blocks until the vector is computed; the model is loaded on first use.

        Raises:
            ModelKindError, InvalidParameterError, ContextLengthError, BusyError: as for
                :meth:`embed_documents`.
        """
        result = self._engine().embed(
            self.model,
            [_check_text(text)],
            query=True,
            task=self.query_task,
            truncate=self.truncate,
            timeout=self.timeout,
        )
        return result.vectors[0]

    # -- async ---------------------------------------------------------------------------------------------------
    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async :meth:`embed_documents`: never blocks the event loop.

        Cancelling the task aborts the text being run on the NPU; the batches
        already embedded are discarded and the model is free for the next request.
        """
        engine = self._engine()
        vectors: list[list[float]] = []
        for batch in _batches(_check_texts(texts), self.batch_size):
            result = await engine.aembed(self.model, batch, truncate=self.truncate, timeout=self.timeout)
            vectors.extend(result.vectors)
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        """Async :meth:`embed_query`: never blocks the event loop; cancelling aborts the run."""
        result = await self._engine().aembed(
            self.model,
            [_check_text(text)],
            query=True,
            task=self.query_task,
            truncate=self.truncate,
            timeout=self.timeout,
        )
        return result.vectors[0]


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
