"""``RKLLMEmbedding``: a LlamaIndex embedding model that runs on the Rockchip NPU, in-process.

It is a thin adapter over :class:`rkllm_core.embed.EmbeddingEngine`:

* documents are embedded as they are and queries with the model's query
  instruction (Qwen3-Embedding: ``Instruct: {task}``, then ``Query:{text}`` on
  the next line), as the model's published recipe writes them
  (:mod:`rkllm_core.embed.recipes`);
* a batch of texts (``embed_batch_size``, LlamaIndex's field) is one request to
  the engine: one lease on the model and one session on its handle;
* the async methods await the engine's async calls: nothing blocks the event
  loop and no thread is occupied while waiting, and cancelling a task aborts the
  text being run on the NPU.

The model is leased from a :class:`rkllm_core.models.manager.ModelManager`, the
same kind that serves :class:`~llamaindex_rkllm.RKLLM`: an embedding model, a
reranker and a chat model can stay loaded side by side within its budget.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, field_validator, model_validator

from rkllm_core.embed import EmbeddingEngine, EmbedOptions

from ._common import ModelClient, check_model, check_optional_text

__all__ = ["RKLLMEmbedding"]


class RKLLMEmbedding(ModelClient[EmbeddingEngine], BaseEmbedding):
    """An embedding model on the Rockchip NPU (RKLLM runtime) as a LlamaIndex embedding model.

    Constructing it loads nothing: the runtime library and the model are loaded
    by the model manager on the first request. Only models of the ``embedding``
    kind are served; any other is refused with
    :class:`~rkllm_core.errors.ModelKindError` before anything is loaded.

    Examples:
        ```python
        from llama_index.core import VectorStoreIndex
        from llamaindex_rkllm import RKLLMEmbedding

        embed_model = RKLLMEmbedding(model_name="qwen3-embedding-0.6b")
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
        ```

    ``model_name=`` (LlamaIndex's spelling, as in ``HuggingFaceEmbedding`` and
    ``OllamaEmbedding``), ``model=`` and the first argument name the model; with none,
    ``RKLLM_EMBED_MODEL`` does. Ollama's ``request_timeout`` is ``timeout``; an argument
    this class does not know is ignored with a ``UserWarning`` naming it.

    Args:
        model: the model (see the ``model`` field); default ``$RKLLM_EMBED_MODEL``.
        manager: a :class:`rkllm_core.models.manager.ModelManager` to take the model from
            (budget, swapping); share one with :class:`~llamaindex_rkllm.RKLLM` and
            :class:`~llamaindex_rkllm.RKLLMRerank` to keep their models within one budget.
            Default: one manager per ``model_dir``/``library_path`` pair, or the
            process-wide manager when neither is set.
        **kwargs: the other fields (and LlamaIndex's: ``embed_batch_size``,
            ``callback_manager``, ``num_workers``, ``embeddings_cache``).

    Raises:
        ValueError: no model is given and ``RKLLM_EMBED_MODEL`` is not set; ``model`` and
            ``model_name`` differ; a setting is invalid (pydantic's ``ValidationError`` is one).
        TypeError: ``manager`` is not a ``ModelManager``.
    """

    model: str = Field(
        description=(
            "The embedding model: a friendly name such as 'qwen3-embedding-0.6b', an alias from "
            "rkllm-models.toml, a .rkllm file name (with or without the suffix) or a path to a .rkllm file. "
            "model_name (LlamaIndex's field) is set to it."
        )
    )
    query_task: str | None = Field(
        default=None,
        description=(
            "The task written into the model's query instruction (Qwen3-Embedding: 'Instruct: {task}\\nQuery:...'); "
            "None keeps the recipe's (web search). Documents are embedded without an instruction."
        ),
    )
    truncate: bool = Field(
        default=True,
        description=(
            "Cut a text longer than the model's context (its beginning is kept, with a warning); "
            "False raises ContextLengthError instead."
        ),
    )

    # -- validation -----------------------------------------------------------------------------
    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return check_model(value)

    @field_validator("query_task")
    @classmethod
    def _check_task(cls, value: str | None) -> str | None:
        return check_optional_text(value, "query_task")

    @model_validator(mode="before")
    @classmethod
    def _model_name_is_the_model(cls, data: Any) -> Any:
        # LlamaIndex reports model_name in its events and callbacks: it is the model actually used.
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            name = data.get("model_name")
            if name is not None and name != data["model"]:
                raise ValueError(f"model_name is the model's name; got {name!r} for model {data['model']!r}")
            data = {**data, "model_name": data["model"]}
        return data

    @classmethod
    def class_name(cls) -> str:
        """Name used by LlamaIndex for serialisation and callbacks."""
        return "RKLLMEmbedding"

    engine_class = EmbeddingEngine
    model_env = "RKLLM_EMBED_MODEL"
    model_example = "qwen3-embedding-0.6b"

    # -- embeddings -----------------------------------------------------------------------------
    def _options(self, query: bool) -> EmbedOptions:
        """The engine's options for documents, or for queries (with the query instruction)."""
        task = self.query_task if query else None
        return EmbedOptions(query=query, task=task, truncate=self.truncate, timeout=self.timeout)

    def _embed(self, texts: list[str], query: bool) -> list[Embedding]:
        return self.engine.embed(self.model, texts, **self._options(query)).vectors

    async def _aembed(self, texts: list[str], query: bool) -> list[Embedding]:
        return (await self.engine.aembed(self.model, texts, **self._options(query))).vectors

    def _get_query_embedding(self, query: str) -> Embedding:
        """Embed a query, written with the model's query instruction (``query_task``)."""
        return self._embed([query], query=True)[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        """Async :meth:`_get_query_embedding`: never blocks the event loop."""
        return (await self._aembed([query], query=True))[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        """Embed a document as it is."""
        return self._embed([text], query=False)[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        """Async :meth:`_get_text_embedding`."""
        return (await self._aembed([text], query=False))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        """Embed a batch of documents: one request, one lease on the model."""
        return self._embed(list(texts), query=False)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        """Async :meth:`_get_text_embeddings`; cancelling aborts the text being run and skips the rest."""
        return await self._aembed(list(texts), query=False)


# ------------------------------------------------------------------------------------- shared checks
