"""How each model family computes embeddings and relevance scores: one table, overridable per model.

An embedding model is a language model whose last hidden layer is the
embedding; how a text goes in and which rows come out is the model's own
*recipe*, published with it. Following it exactly matters: the same model fed
through the runtime's chat template, pooled differently or without its end
token gives vectors that are all alike (rknn-llm #515). The recipes here are
the published ones:

* **Qwen3-Embedding**: the text as is, followed by ``<|endoftext|>``; the
  hidden state of that last token (last-token pooling), L2-normalised.
  Queries, and only queries, are prefixed with an instruction:
  ``Instruct: {task}`` and ``Query:{text}`` on two lines.
* **Qwen3-Reranker**: a yes/no judgement. The prompt is the model's system
  prompt, ``<Instruct>: … <Query>: … <Document>: …`` as the user turn, and an
  assistant turn opened with an empty think block; the score is P(yes), the
  softmax over the logits of the ``yes`` and ``no`` tokens at the last position.

A model's ``rkllm-models.toml`` entry may override any field (``embedding =
{ pooling = "mean" }``) or declare a whole recipe for a family this table does
not know; without one such a model is refused with a message that says how to
declare it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final, Literal, TypeVar

from ..errors import InvalidParameterError
from ..models.registry import ModelInfo

__all__ = ["EmbeddingRecipe", "RerankRecipe", "embedding_recipe", "rerank_recipe"]

Pooling = Literal["last", "mean"]


@dataclass(frozen=True, slots=True)
class EmbeddingRecipe:
    """How a family turns texts into vectors.

    Attributes:
        pooling: ``"last"`` (the last token's hidden state) or ``"mean"`` (the mean over all tokens).
        normalize: L2-normalise the vector.
        query_template: how a query is written, with ``{task}`` and ``{text}``;
            documents are sent as they are. ``None``: queries as they are too.
        task: the default task of ``query_template``.
        suffix: text appended to every input (the end token the model was
            trained to pool); on the token path its token id.
    """

    pooling: Pooling = "last"
    normalize: bool = True
    query_template: str | None = None
    task: str = ""
    suffix: str = ""


@dataclass(frozen=True, slots=True)
class RerankRecipe:
    """How a family scores a (query, document) pair.

    Attributes:
        template: the whole prompt, with ``{instruction}``, ``{query}`` and ``{document}``.
        instruction: the default instruction.
        yes_token: the token whose probability is the score.
        no_token: the token it competes with.
        yes_id: ``yes_token``'s id in the model's vocabulary (used when no
            ``tokenizer.json`` sits beside the model file).
        no_id: ``no_token``'s id.
    """

    template: str
    instruction: str = ""
    yes_token: str = "yes"
    no_token: str = "no"
    yes_id: int = -1
    no_id: int = -1


_WEB_SEARCH_TASK: Final = "Given a web search query, retrieve relevant passages that answer the query"

QWEN3_EMBEDDING: Final = EmbeddingRecipe(
    pooling="last",
    normalize=True,
    query_template="Instruct: {task}\nQuery:{text}",
    task=_WEB_SEARCH_TASK,
    suffix="<|endoftext|>",
)

QWEN3_RERANKER: Final = RerankRecipe(
    template=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ),
    instruction=_WEB_SEARCH_TASK,
    yes_token="yes",
    no_token="no",
    yes_id=9693,  # Qwen tokenizer ids
    no_id=2152,
)

# family (ModelFacts.family) -> recipe. The one place a new family is declared.
EMBEDDING_RECIPES: Final[dict[str, EmbeddingRecipe]] = {"qwen3": QWEN3_EMBEDDING}
RERANK_RECIPES: Final[dict[str, RerankRecipe]] = {"qwen3": QWEN3_RERANKER}


_R = TypeVar("_R", EmbeddingRecipe, RerankRecipe)


def _with_overrides(base: _R, overrides: tuple[tuple[str, Any], ...] | None) -> _R:
    return replace(base, **dict(overrides)) if overrides else base


def embedding_recipe(info: ModelInfo) -> EmbeddingRecipe:
    """The embedding recipe of ``info``: its family's, with the registry file's ``embedding`` overrides.

    Raises:
        InvalidParameterError: the family has no known recipe and the registry file declares none.
    """
    overrides = info.defaults.embedding
    base = EMBEDDING_RECIPES.get(info.facts.family or "")
    if base is None and not overrides:
        raise InvalidParameterError(
            f"no embedding recipe is known for {info.name!r} ({info.filename}, family "
            f"{info.facts.family or 'unknown'}); declare the model's own in rkllm-models.toml, e.g. "
            f'[models."{info.name}"] embedding = {{ pooling = "mean", normalize = true }} '
            f"(known families: {', '.join(sorted(EMBEDDING_RECIPES))})"
        )
    return _with_overrides(base or EmbeddingRecipe(), overrides)


def rerank_recipe(info: ModelInfo) -> RerankRecipe:
    """The reranking recipe of ``info``: its family's, with the registry file's ``reranker`` overrides.

    Raises:
        InvalidParameterError: the family has no known recipe and the registry file declares no
            complete one (a ``template`` and the ``yes_id``/``no_id`` token ids).
    """
    overrides = dict(info.defaults.reranker or ())
    base = RERANK_RECIPES.get(info.facts.family or "")
    if base is None and not {"template", "yes_id", "no_id"} <= set(overrides):
        raise InvalidParameterError(
            f"no reranking recipe is known for {info.name!r} ({info.filename}, family "
            f"{info.facts.family or 'unknown'}); declare the model's own in rkllm-models.toml: "
            f'[models."{info.name}"] reranker = {{ template = "...{{instruction}}...{{query}}...{{document}}...", '
            f"yes_id = ..., no_id = ... }} (known families: {', '.join(sorted(RERANK_RECIPES))})"
        )
    if base is None:
        base = RerankRecipe(template=overrides["template"])
    return _with_overrides(base, tuple(overrides.items()))
