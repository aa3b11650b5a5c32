"""``RKLLMRerank``: a LlamaIndex node postprocessor that reranks with a reranker model on the Rockchip NPU.

It is a thin adapter over :meth:`rkllm_core.embed.EmbeddingEngine.rerank`: each
node's content (``MetadataMode.EMBED``, as LlamaIndex's own rerankers read it)
is judged against the query by the reranker (Qwen3-Reranker: P("yes") to "does
the Document meet the requirements of the Query?"), and the ``top_n`` nodes come
back best first with that probability, in [0, 1], as their score.

The async path (:meth:`~llama_index.core.postprocessor.types.BaseNodePostprocessor.apostprocess_nodes`,
used by ``aquery``/``achat``) awaits the engine's async call: it never blocks the
event loop, and cancelling the task aborts the document being scored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from llama_index.core.bridge.pydantic import Field, field_validator
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from rkllm_core.embed import EmbeddingEngine, RerankOptions

from ._common import ModelClient, check_model, check_optional_text

__all__ = ["RKLLMRerank"]

dispatcher = get_dispatcher(__name__)


class RKLLMRerank(ModelClient[EmbeddingEngine], BaseNodePostprocessor):
    """A reranker model on the Rockchip NPU (RKLLM runtime) as a LlamaIndex node postprocessor.

    Constructing it loads nothing: the runtime library and the model are loaded
    by the model manager on the first request. Only models of the ``reranker``
    kind are served; any other is refused with
    :class:`~rkllm_core.errors.ModelKindError` before anything is loaded.

    Examples:
        ```python
        from llamaindex_rkllm import RKLLM, RKLLMRerank

        query_engine = index.as_query_engine(
            llm=RKLLM(model="qwen3-0.6b"),
            similarity_top_k=10,
            node_postprocessors=[RKLLMRerank(model="qwen3-reranker-0.6b", top_n=3)],
        )
        ```

    Each node is one run of the model (the documents take turns on its handle), so
    the cost grows with ``similarity_top_k``: retrieve a few more than ``top_n``,
    not hundreds.

    The model is the first argument, ``model=`` or ``model_name=``; with none,
    ``RKLLM_RERANK_MODEL`` names it. Ollama's ``request_timeout`` is ``timeout``; an
    argument this class does not know is ignored with a ``UserWarning`` naming it.

    Args:
        model: the model (see the ``model`` field); default ``$RKLLM_RERANK_MODEL``.
        manager: a :class:`rkllm_core.models.manager.ModelManager` to take the model from
            (budget, swapping); share one with :class:`~llamaindex_rkllm.RKLLM` and
            :class:`~llamaindex_rkllm.RKLLMEmbedding` to keep their models within one budget.
            Default: one manager per ``model_dir``/``library_path`` pair, or the
            process-wide manager when neither is set.
        **kwargs: the other fields (and ``callback_manager``).

    Raises:
        ValueError: no model is given and ``RKLLM_RERANK_MODEL`` is not set; ``model`` and
            ``model_name`` differ; a setting is invalid (pydantic's ``ValidationError`` is one).
        TypeError: ``manager`` is not a ``ModelManager``.
    """

    model: str = Field(
        description=(
            "The reranker model: a friendly name such as 'qwen3-reranker-0.6b', an alias from rkllm-models.toml, "
            "a .rkllm file name (with or without the suffix) or a path to a .rkllm file."
        )
    )
    top_n: int = Field(default=3, gt=0, description="How many nodes to return, the most relevant first.")
    instruction: str | None = Field(
        default=None,
        description=(
            "What relevance means, written into the reranker's prompt (Qwen3-Reranker: '<Instruct>: ...'); "
            "None keeps the recipe's (web search)."
        ),
    )
    truncate: bool = Field(
        default=True,
        description=(
            "Cut a node's content that does not fit the model's context with the query (its beginning is kept, "
            "with a warning); False raises ContextLengthError instead."
        ),
    )

    # -- validation -----------------------------------------------------------------------------
    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return check_model(value)

    @field_validator("instruction")
    @classmethod
    def _check_instruction(cls, value: str | None) -> str | None:
        return check_optional_text(value, "instruction")

    @classmethod
    def class_name(cls) -> str:
        """Name used by LlamaIndex for serialisation and callbacks."""
        return "RKLLMRerank"

    engine_class = EmbeddingEngine
    model_env = "RKLLM_RERANK_MODEL"
    model_example = "qwen3-reranker-0.6b"

    # -- postprocessing -------------------------------------------------------------------------
    # The sequence (events, the empty case, choosing the top nodes) is written once, in
    # ``_reranking``; the two methods differ only in the one call to the engine.
    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        """Score every node for the query and return the ``top_n`` best, each with its new score.

        The nodes passed in are left as they are; the ones returned are new
        ``NodeWithScore`` objects around the same nodes.

        Raises:
            ValueError: no query (``query_bundle`` is ``None``).
            ModelKindError: ``model`` is not a reranker (nothing is loaded).
            ContextLengthError: a node does not fit and ``truncate`` is False.
            BusyError, RunError: see their docs.
        """
        with self._reranking(nodes, query_bundle) as job:
            if job.contents:
                job.rank(self.engine.rerank(self.model, job.query, job.contents, **self._options()).scores)
        return job.ranked

    async def _apostprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        """Async :meth:`_postprocess_nodes`: never blocks the event loop; cancelling aborts the scoring."""
        with self._reranking(nodes, query_bundle) as job:
            if job.contents:
                job.rank((await self.engine.arerank(self.model, job.query, job.contents, **self._options())).scores)
        return job.ranked

    # -- helpers --------------------------------------------------------------------------------
    @contextmanager
    def _reranking(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None) -> Iterator[_Job]:
        """One reranking, around the call to the engine: LlamaIndex's events, start to end.

        An error raised in the ``with`` block ends the ``RERANKING`` callback event with it.

        Raises:
            ValueError: no query (``query_bundle`` is ``None``), after ``ReRankStartEvent``.
        """
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n, model_name=self.model))
        if query_bundle is None:
            raise ValueError("RKLLMRerank needs the query: pass query_bundle or query_str")
        job = _Job(query_bundle.query_str, nodes, self.top_n)
        if nodes:
            with self.callback_manager.event(CBEventType.RERANKING, payload=self._payload(nodes, job.query)) as event:
                yield job
                event.on_end(payload={EventPayload.NODES: job.ranked})
        else:
            yield job  # nothing to score: no callback event, no model
        dispatcher.event(ReRankEndEvent(nodes=job.ranked))

    def _options(self) -> RerankOptions:
        return RerankOptions(instruction=self.instruction, truncate=self.truncate, timeout=self.timeout)

    def _payload(self, nodes: list[NodeWithScore], query: str) -> dict[str, Any]:
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: self.model,
            EventPayload.QUERY_STR: query,
            EventPayload.TOP_K: self.top_n,
        }


class _Job:
    """One reranking's data: the query, the nodes' contents, and the ``top_n`` nodes once scored."""

    def __init__(self, query: str, nodes: Sequence[NodeWithScore], top_n: int) -> None:
        self.query = query
        self.nodes = nodes
        self.top_n = top_n
        self.contents = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
        self.ranked: list[NodeWithScore] = []

    def rank(self, scores: Sequence[float]) -> None:
        """Keep the ``top_n`` nodes by score, best first (ties keep their retrieval order)."""
        order = sorted(range(len(self.nodes)), key=lambda i: -scores[i])[: self.top_n]
        self.ranked = [NodeWithScore(node=self.nodes[i].node, score=scores[i]) for i in order]
