"""Embeddings and relevance scores on the NPU, through the same manager and handles as chat.

A call takes a lease on the model (an ``embedding`` or ``reranker`` model;
any other kind is refused before it loads) and one session on its handle, then
runs each text in turn with ``keep_history=0``: no re-initialisation between
texts, nothing accumulating in the KV cache. The runtime's chat template is
replaced by an empty one for the duration, so the text reaches the model
exactly as its recipe (:mod:`rkllm_core.embed.recipes`) writes it.

**Tokens.** When the model's ``tokenizer.json`` sits beside the ``.rkllm``
file (as ``<file stem>.tokenizer.json``, or as ``tokenizer.json`` in a
directory holding no other model) and the ``tokenizers`` package is installed,
texts are tokenised with it and sent as token ids: the exact input the model
was trained on, and exact truncation. Otherwise the text is sent as text
(special tokens such as ``<|endoftext|>`` written in it, which the runtime's
tokenizer reads as the special tokens themselves, the way it reads the chat
templates it is given); this is the same input as long as the runtime's
tokenizer is the model's own, which conversion guarantees. Token counts for
truncation are then estimated conservatively (:func:`~rkllm_core.params.estimate_tokens`).

**Long texts** are cut to the context (the beginning is kept) with a warning,
or refused with :class:`~rkllm_core.errors.ContextLengthError` when
``truncate=False``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar, Unpack

from .._sync import Deadline
from ..errors import ContextLengthError, InvalidParameterError, RunError
from ..models.manager import Lease, ModelManager, default_manager
from ..models.registry import ModelInfo, require_kind
from ..params import Tensor, check_text, estimate_tokens
from ..runtime import ChatTemplate, RKLLMRuntime, RunOptions, Session
from ..runtime.handle import InferMode
from .recipes import EmbeddingRecipe, RerankRecipe, embedding_recipe, rerank_recipe

__all__ = ["EmbedOptions", "EmbeddingEngine", "EmbeddingResult", "RerankOptions", "RerankResult"]

logger = logging.getLogger(__name__)

_EMBED = (("embedding",), "the embeddings classes (RKLLMEmbeddings, RKLLMEmbedding, EmbeddingEngine.embed)")
_RERANK = (("reranker",), "the rerankers (RKLLMRerank, EmbeddingEngine.rerank)")
_EMPTY_TEMPLATE = ChatTemplate("", "", "")
# Positions kept free of input: the runtime's own bookkeeping at the end of a prefill.
_CONTEXT_MARGIN = 4
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """Vectors for a batch of texts.

    Attributes:
        vectors: one vector per text, in input order.
        model: the model's friendly name.
        input_tokens: tokens prefilled (the runtime's count when it reports one).
        truncated: how many texts were cut to the context.
    """

    vectors: list[list[float]]
    model: str
    input_tokens: int
    truncated: int


@dataclass(frozen=True, slots=True)
class RerankResult:
    """Relevance scores of documents for a query.

    Attributes:
        scores: P(relevant) in [0, 1] per document, in input order.
        model: the model's friendly name.
        input_tokens: tokens prefilled.
        truncated: how many documents were cut to the context.
    """

    scores: list[float]
    model: str
    input_tokens: int
    truncated: int


@dataclass(frozen=True, slots=True)
class _Input:
    prompt: str | None
    token_ids: tuple[int, ...] | None
    cut: bool


# -- tokenizers ---------------------------------------------------------------------------------------------

_tokenizers: dict[Path, tuple[float, Any]] = {}
_tokenizers_lock = threading.Lock()


def tokenizer_path(info: ModelInfo) -> Path | None:
    """The ``tokenizer.json`` that belongs to ``info``'s file, if there is one."""
    own = info.path.with_name(f"{info.stem}.tokenizer.json")
    if own.is_file():
        return own
    shared = info.path.with_name("tokenizer.json")
    if shared.is_file():
        try:
            others = [e for e in os.listdir(info.path.parent) if e.lower().endswith(".rkllm")]
        except OSError:
            return None
        if len(others) <= 1:
            return shared
    return None


def _tokenizer_for(info: ModelInfo) -> Any | None:
    path = tokenizer_path(info)
    if path is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        logger.warning("%s is there but the tokenizers package is not installed; sending text", path)
        return None
    mtime = path.stat().st_mtime
    with _tokenizers_lock:
        cached = _tokenizers.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # a broken file: the text path still works
        logger.warning("cannot read %s (%s); sending text", path, exc)
        return None
    with _tokenizers_lock:
        _tokenizers[path] = (mtime, tokenizer)
    return tokenizer


def _ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def _token_id(tokenizer: Any, token: str, fallback: int) -> int:
    found = tokenizer.token_to_id(token) if tokenizer is not None else None
    return int(found) if found is not None else fallback


# -- input preparation ---------------------------------------------------------------------------------------


def _check_texts(texts: Sequence[str], field: str) -> list[str]:
    if isinstance(texts, str):
        raise InvalidParameterError(f"{field} must be a list of strings, not one string")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidParameterError(f"{field}[{i}] must be a string, got {type(text).__name__}")
        out.append(check_text(text, f"{field}[{i}]"))
    return out


def _cut_text(text: str, budget_tokens: int) -> str:
    """The longest beginning of ``text`` whose estimated token count fits ``budget_tokens``."""
    data = text.encode("utf-8")[: max(0, budget_tokens) * 3]
    return data.decode("utf-8", "ignore")


def _fit(
    head: str, text: str, tail: str, limit: int, tokenizer: Any | None, truncate: bool, what: str, model: str
) -> _Input:
    """``head + text + tail`` as one run's input within ``limit`` tokens, cutting ``text`` if allowed."""
    if tokenizer is not None:
        head_ids, text_ids, tail_ids = (_ids_of(tokenizer, part) if part else [] for part in (head, text, tail))
        room = limit - len(head_ids) - len(tail_ids)
        cut = len(text_ids) > room
        if cut and (not truncate or room <= 0):
            raise ContextLengthError(
                f"{what} is {len(head_ids) + len(text_ids) + len(tail_ids)} tokens, above the {limit}-token "
                f"context of {model}" + ("" if truncate else "; pass truncate=True to cut it"),
                requested=len(head_ids) + len(text_ids) + len(tail_ids),
                limit=limit,
            )
        ids = head_ids + text_ids[: max(room, 0)] + tail_ids
        return _Input(None, tuple(ids), cut)
    fixed = estimate_tokens(head) + estimate_tokens(tail)
    needed = fixed + estimate_tokens(text)
    cut = needed > limit
    if cut:
        if not truncate or fixed >= limit:
            raise ContextLengthError(
                f"{what} is about {needed} tokens, above the {limit}-token context of {model}"
                + ("" if truncate else "; pass truncate=True to cut it"),
                requested=needed,
                limit=limit,
            )
        text = _cut_text(text, limit - fixed)
    prompt = head + text + tail
    if not prompt:
        raise InvalidParameterError(f"{what} is empty and the model's recipe adds nothing to it")
    return _Input(prompt, None, cut)


def _embedding_inputs(
    recipe: EmbeddingRecipe,
    texts: list[str],
    query: bool,
    task: str | None,
    limit: int,
    tokenizer: Any | None,
    truncate: bool,
    model: str,
) -> list[_Input]:
    out = []
    for i, text in enumerate(texts):
        head = ""
        if query and recipe.query_template:
            marker = "\0text\0"
            written = recipe.query_template.format(task=task or recipe.task, text=marker)
            head, _, rest = written.partition(marker)
            text = text + rest
        out.append(_fit(head, text, recipe.suffix, limit, tokenizer, truncate, f"text {i}", model))
    return out


def _rerank_inputs(
    recipe: RerankRecipe,
    query: str,
    documents: list[str],
    instruction: str | None,
    limit: int,
    tokenizer: Any | None,
    truncate: bool,
    model: str,
) -> list[_Input]:
    marker = "\0document\0"
    written = recipe.template.format(instruction=instruction or recipe.instruction, query=query, document=marker)
    head, _, tail = written.partition(marker)
    return [
        _fit(head, doc, tail, limit, tokenizer, truncate, f"document {i}", model) for i, doc in enumerate(documents)
    ]


# -- results -------------------------------------------------------------------------------------------------


def _pool(tensor: Tensor, recipe: EmbeddingRecipe) -> list[float]:
    if recipe.pooling == "last":
        vector = list(tensor.row(-1))
    else:
        vector = [0.0] * tensor.cols
        for r in range(tensor.rows):
            for k, value in enumerate(tensor.row(r)):
                vector[k] += value
        vector = [v / tensor.rows for v in vector]
    if recipe.normalize:
        norm = math.sqrt(math.fsum(v * v for v in vector))
        if norm > 0:
            vector = [v / norm for v in vector]
    return vector


def _p_yes(tensor: Tensor, yes: int, no: int, model: str) -> float:
    if not (0 <= yes < tensor.cols and 0 <= no < tensor.cols):
        raise RunError(
            f"{model}: the yes/no token ids {yes}/{no} are outside its {tensor.cols}-entry vocabulary; "
            "set reranker = { yes_id = ..., no_id = ... } in rkllm-models.toml",
            function="rkllm_run",
        )
    row = tensor.row(-1)
    diff = row[no] - row[yes]
    return 1.0 / (1.0 + math.exp(diff)) if diff < 700 else 0.0


def _tokens(tensors: Sequence[Tensor], inputs: Sequence[_Input]) -> int:
    total = 0
    for tensor, item in zip(tensors, inputs, strict=True):
        if tensor.stats is not None and tensor.stats.prefill_tokens > 0:
            total += tensor.stats.prefill_tokens
        else:
            total += len(item.token_ids) if item.token_ids is not None else estimate_tokens(item.prompt or "")
    return total


def _warn_cut(count: int, total: int, what: str, model: str, limit: int) -> None:
    if count:
        logger.warning("%d of %d %s were cut to the %d-token context of %s", count, total, what, limit, model)


# -- one sequence, two drivers -------------------------------------------------------------------------------
#
# Every call is one *flow*: a plain generator that yields the steps it waits for (a lease, the handle, a short
# call, one run) and receives what each produced. Only the steps know how to wait, blocking on a thread or
# awaiting in a task; :func:`_drive` and :func:`_adrive` are the only code that differs between ``embed`` and
# ``aembed``. Closing the flow (an error or a cancelled task) runs its ``finally`` blocks, which let go of the
# handle and the lease.


@dataclass(frozen=True, slots=True)
class _Step:
    """Something a flow waits for, in both colours.

    Attributes:
        blocking: performs the step on the calling thread.
        awaiting: performs the step without blocking the event loop.
    """

    blocking: Callable[[], Any]
    awaiting: Callable[[], Awaitable[Any]]


_Flow = Generator[_Step, Any, _R]


def _take_model(manager: ModelManager, model: str, timeout: float | None) -> _Step:
    """A lease on ``model``: a place in the manager's line, left at once by a cancelled task."""
    return _Step(partial(manager.lease, model, timeout=timeout), partial(manager.alease, model, timeout=timeout))


def _take_handle(runtime: RKLLMRuntime, timeout: float | None) -> _Step:
    """A session on the leased model's handle (an active one)."""
    session = runtime.session(timeout)
    return _Step(session.acquire, session.acquire_async)


def _off_loop(session: Session, fn: Callable[..., Any], *args: Any) -> _Step:
    """A short call that reads files or touches the handle: on the core's executor for a task."""
    return _Step(partial(fn, *args), partial(session.call, fn, *args))


def _infer(session: Session, item: _Input, mode: InferMode) -> _Step:
    """One input run with nothing kept in the KV cache; a cancelled task aborts it."""
    run: RunOptions = {"token_ids": item.token_ids, "mode": mode, "keep_history": False}
    return _Step(partial(session.infer, item.prompt, **run), partial(session.ainfer, item.prompt, **run))


class _Walk(Generic[_R]):
    """A driver's view of a flow: iterate for the steps, set :attr:`reply` to what each one produced."""

    def __init__(self, flow: _Flow[_R]) -> None:
        self._flow = flow
        self.reply: Any = None
        self.result: _R

    def __iter__(self) -> Iterator[_Step]:
        while True:
            try:
                step = self._flow.send(self.reply)
            except StopIteration as end:
                self.result = end.value
                return
            yield step


def _drive(flow: _Flow[_R]) -> _R:
    """Perform ``flow``'s steps on the calling thread."""
    walk = _Walk(flow)
    with closing(flow):
        for step in walk:
            walk.reply = step.blocking()
    return walk.result


async def _adrive(flow: _Flow[_R]) -> _R:
    """Perform ``flow``'s steps in the calling task, never blocking the event loop."""
    walk = _Walk(flow)
    with closing(flow):
        for step in walk:
            walk.reply = await step.awaiting()
    return walk.result


# What a request contributes once the model and its context are known: the inputs to run, and how a run's
# tensor becomes the request's value (a vector, a score).
_Prepare = Callable[[Any, int, str], tuple[list[_Input], Callable[[Tensor], Any]]]


@dataclass(frozen=True, slots=True)
class _Outcome:
    model: str
    values: list[Any]
    input_tokens: int
    truncated: int


# -- the engine ----------------------------------------------------------------------------------------------


class EmbedOptions(TypedDict, total=False):
    """The options of :meth:`EmbeddingEngine.embed` and :meth:`~EmbeddingEngine.aembed`.

    Attributes:
        query: write each text as a query (the recipe's instruction, if it has one); default False.
        task: the query instruction's task (default: the recipe's).
        truncate: cut texts longer than the context (with a warning) instead of raising; default True.
        timeout: seconds to wait for the model and its handle (default: no limit).
    """

    query: bool
    task: str | None
    truncate: bool
    timeout: float | None


class RerankOptions(TypedDict, total=False):
    """The options of :meth:`EmbeddingEngine.rerank` and :meth:`~EmbeddingEngine.arerank`.

    Attributes:
        instruction: the recipe's instruction replaced (default: the recipe's).
        truncate: cut documents longer than the context (with a warning) instead of raising; default True.
        timeout: seconds to wait for the model and its handle (default: no limit).
    """

    instruction: str | None
    truncate: bool
    timeout: float | None


class EmbeddingEngine:
    """Embeds texts and scores documents with embedding and reranker models.

    Stateless apart from its manager: any number of threads and tasks may use
    one engine (calls on one model take turns on its handle; an embedding model
    and a chat model can be loaded together within the manager's budget).

    Args:
        manager: the model manager (default: :func:`~rkllm_core.models.manager.default_manager`).
    """

    def __init__(self, manager: ModelManager | None = None) -> None:
        self._manager = manager

    @property
    def manager(self) -> ModelManager:
        """The model manager requests go to."""
        if self._manager is None:
            self._manager = default_manager()
        return self._manager

    # -- embeddings -------------------------------------------------------------------------------------------
    def embed(self, model: str, texts: Sequence[str], **options: Unpack[EmbedOptions]) -> EmbeddingResult:
        """Embed ``texts`` (documents, or queries with ``query=True``) with ``model``.

        Args:
            model: an embedding model's name.
            texts: the texts.
            **options: ``query``, ``task``, ``truncate``, ``timeout`` (see :class:`EmbedOptions`).

        Raises:
            ModelKindError: ``model`` is not an embedding model (nothing is loaded).
            InvalidParameterError: a text is not a string or not valid text; no recipe for the family.
            ContextLengthError: a text does not fit and ``truncate`` is False.
            BusyError, RunError: see their docs.
        """
        return _drive(self._embedding(model, texts, **options))

    async def aembed(self, model: str, texts: Sequence[str], **options: Unpack[EmbedOptions]) -> EmbeddingResult:
        """Async :meth:`embed`: never blocks the event loop; cancelling aborts the text being run."""
        return await _adrive(self._embedding(model, texts, **options))

    # -- reranking --------------------------------------------------------------------------------------------
    def rerank(
        self, model: str, query: str, documents: Sequence[str], **options: Unpack[RerankOptions]
    ) -> RerankResult:
        """Score each of ``documents`` for ``query`` with a reranker model (P(relevant), input order).

        Args:
            model: a reranker model's name.
            query: the query.
            documents: the documents.
            **options: ``instruction``, ``truncate``, ``timeout`` (see :class:`RerankOptions`).

        Raises:
            ModelKindError: ``model`` is not a reranker (nothing is loaded).
            InvalidParameterError: bad text; no recipe for the family.
            ContextLengthError: a document does not fit and ``truncate`` is False.
            BusyError, RunError: see their docs.
        """
        return _drive(self._reranking(model, query, documents, **options))

    async def arerank(
        self, model: str, query: str, documents: Sequence[str], **options: Unpack[RerankOptions]
    ) -> RerankResult:
        """Async :meth:`rerank`: never blocks the event loop; cancelling aborts the document being run."""
        return await _adrive(self._reranking(model, query, documents, **options))

    # -- the flows --------------------------------------------------------------------------------------------
    def _embedding(
        self,
        model: str,
        texts: Sequence[str],
        *,
        query: bool = False,
        task: str | None = None,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> _Flow[EmbeddingResult]:
        items = _embed_args(texts, task)
        if not items:
            return EmbeddingResult([], model, 0, 0)
        deadline = Deadline(timeout)
        recipe = embedding_recipe(self._checked(model, _EMBED))  # refused before anything loads

        def prepare(tokenizer: Any, limit: int, name: str) -> tuple[list[_Input], Callable[[Tensor], list[float]]]:
            inputs = _embedding_inputs(recipe, items, query, task, limit, tokenizer, truncate, name)
            return inputs, lambda tensor: _pool(tensor, recipe)

        out = yield from self._flow(model, deadline, "hidden", "texts", prepare)
        return EmbeddingResult(out.values, out.model, out.input_tokens, out.truncated)

    def _reranking(
        self,
        model: str,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str | None = None,
        truncate: bool = True,
        timeout: float | None = None,
    ) -> _Flow[RerankResult]:
        query, docs = _rerank_args(query, documents, instruction)
        if not docs:
            return RerankResult([], model, 0, 0)
        deadline = Deadline(timeout)
        recipe = rerank_recipe(self._checked(model, _RERANK))  # refused before anything loads

        def prepare(tokenizer: Any, limit: int, name: str) -> tuple[list[_Input], Callable[[Tensor], float]]:
            inputs = _rerank_inputs(recipe, query, docs, instruction, limit, tokenizer, truncate, name)
            yes = _token_id(tokenizer, recipe.yes_token, recipe.yes_id)
            no = _token_id(tokenizer, recipe.no_token, recipe.no_id)
            return inputs, lambda tensor: _p_yes(tensor, yes, no, name)

        out = yield from self._flow(model, deadline, "logits", "documents", prepare)
        return RerankResult(out.values, out.model, out.input_tokens, out.truncated)

    def _flow(self, model: str, deadline: Deadline, mode: InferMode, what: str, prepare: _Prepare) -> _Flow[_Outcome]:
        """Lease → session → prepare → one run per input → let go: the sequence behind every call."""
        lease: Lease = yield _take_model(self.manager, model, deadline.remaining())
        try:
            session: Session = yield _take_handle(lease.runtime, deadline.remaining())
            try:
                inputs, value_of = yield _off_loop(session, self._setup, session, lease, prepare, what)
                tensors: list[Tensor] = []
                for item in inputs:
                    tensors.append((yield _infer(session, item, mode)))
            finally:
                session.release()
            lease.record_stats(tensors[-1].stats)
        finally:
            lease.release()
        values = [value_of(tensor) for tensor in tensors]
        return _Outcome(lease.info.name, values, _tokens(tensors, inputs), sum(i.cut for i in inputs))

    # -- internals ------------------------------------------------------------------------------------------
    def _checked(self, model: str, kinds: tuple[tuple[str, ...], str]) -> ModelInfo:
        """``model``'s registry entry, refused unless of one of ``kinds`` (nothing is loaded)."""
        info = self.manager.resolve(model)
        require_kind(info, *kinds)
        return info

    @staticmethod
    def _setup(
        session: Session, lease: Lease, prepare: _Prepare, what: str
    ) -> tuple[list[_Input], Callable[[Tensor], Any]]:
        """The inputs within the model's context, and the runtime's template out of their way."""
        tokenizer = _tokenizer_for(lease.info)
        limit = max(1, lease.runtime.max_context_len - _CONTEXT_MARGIN)
        inputs, value_of = prepare(tokenizer, limit, lease.info.name)
        _warn_cut(sum(i.cut for i in inputs), len(inputs), what, lease.info.name, limit)
        if session.chat_setup != _EMPTY_TEMPLATE:
            _EMPTY_TEMPLATE.install(session)
        return inputs, value_of


def _embed_args(texts: Sequence[str], task: str | None) -> list[str]:
    """The checked texts of an embedding request (raises ``InvalidParameterError``)."""
    if task is not None:
        check_text(task, "task")
    return _check_texts(texts, "texts")


def _rerank_args(query: str, documents: Sequence[str], instruction: str | None) -> tuple[str, list[str]]:
    """The checked query and documents of a rerank request (raises ``InvalidParameterError``)."""
    if not isinstance(query, str):
        raise InvalidParameterError(f"query must be a string, got {type(query).__name__}")
    if instruction is not None:
        check_text(instruction, "instruction")
    return check_text(query, "query"), _check_texts(documents, "documents")
