"""Plain-Python value types of the runtime layer (no ctypes here)."""

from __future__ import annotations

import math
from array import array
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

from .errors import ContextLengthError, InvalidParameterError

FinishReason = Literal["stop", "length", "abort"]
"""Why a run ended: the model stopped, hit ``max_new_tokens``, or was aborted."""

__all__ = [
    "FinishReason",
    "ImageTags",
    "check_text",
    "context_len",
    "estimate_tokens",
    "InitParams",
    "PerfStats",
    "SAMPLING_FIELDS",
    "SAMPLING_POLICIES",
    "SamplingPolicy",
    "SamplingParams",
    "StreamChunk",
    "Tensor",
]


def estimate_tokens(text: str) -> int:
    """A conservative token count for ``text``: one token per 3 UTF-8 bytes.

    Real tokenizers average about 4 bytes per token for English and about 3 for
    Chinese, so the estimate errs on the side of trimming early rather than
    overflowing the context.
    """
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 3)


def _check_range(name: str, value: float | int | None, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameterError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InvalidParameterError(f"{name}={value!r} is out of range; expected a value in {bound}")


def _check_int(name: str, value: int | None, lo: int, hi: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"{name} must be an integer, got {type(value).__name__}")
    _check_range(name, value, lo, hi)


def check_text(value: object, field: str) -> str:
    """Return ``value`` if it is text the runtime can take: a str, no NUL, valid UTF-8 (no lone surrogates).

    Raises:
        InvalidParameterError: naming ``field`` and the position of the first bad character.
    """
    if not isinstance(value, str):
        raise InvalidParameterError(f"{field} must be a str, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidParameterError(f"{field} contains a NUL character at position {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(
            f"{field} is not valid text: {exc.reason} at position {exc.start} ({value[exc.start : exc.end]!r})"
        ) from None
    return value


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings. ``None`` means "leave the runtime's value".

    On the 1.3 ABI these can change per run; on 1.2 they are fixed at init.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None

    def __post_init__(self) -> None:
        """Validate every value; raise :class:`InvalidParameterError` with the field name."""
        _check_range("temperature", self.temperature, 0.0, 100.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_int("top_k", self.top_k, 0, 1_000_000)
        _check_range("repeat_penalty", self.repeat_penalty, 0.0, 100.0, lo_open=True)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_int("mirostat", self.mirostat, 0, 2)
        _check_range("mirostat_tau", self.mirostat_tau, 0.0, 100.0)
        _check_range("mirostat_eta", self.mirostat_eta, 0.0, 10.0)

    def is_empty(self) -> bool:
        """Return True when no value is set."""
        return all(getattr(self, f.name) is None for f in fields(self))

    def merged(self, other: SamplingParams | None) -> SamplingParams:
        """Return these settings with every value set in ``other`` taking precedence."""
        if other is None:
            return self
        values = {f.name: getattr(other, f.name) for f in fields(self) if getattr(other, f.name) is not None}
        return SamplingParams(**{**self.as_dict(), **values})

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as a dict (``None`` for unset values)."""
        return asdict(self)


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
"""The sampling settings' names, in declaration order: the one source every other table derives from."""

SamplingPolicy = Literal["instance", "reload", "fixed"]
"""How a model manager serves a request's sampling on the 1.2 ABI, whose runtime fixes it at init.

* ``instance``: one instance per sampling setting (each counted against the budget);
* ``reload``: one instance, re-initialised when a request's sampling differs from its own;
* ``fixed``: one instance with the model's own settings; a request's sampling is ignored (logged
  once per setting, and reported with the response).

On 1.3 sampling is per run and one instance serves every request (reported as ``run``).
"""
SAMPLING_POLICIES: tuple[SamplingPolicy, ...] = ("instance", "reload", "fixed")


def context_len(requested: int | None, limit: int | None, model: str, source: str) -> int | None:
    """The context to initialise ``model`` with: ``requested``, else ``limit``; refused above ``limit``.

    The one check of a context size against a model's limit (the model manager's and
    a direct :class:`~rkllm_core.runtime.RKLLMRuntime`'s), made before ``rkllm_init``.

    Args:
        requested: the ``max_context_len`` asked for (``None``: the model's limit).
        limit: the model's limit (``None``: unknown, nothing to check).
        model: the model's name, for the message.
        source: where the limit comes from, for the message (e.g. "from its file name").

    Raises:
        ContextLengthError: ``requested`` is above ``limit``.
    """
    if requested is None or limit is None or requested <= limit:
        return requested if requested is not None else limit
    raise ContextLengthError(
        f"max_context_len={requested} is above the {limit}-token limit of {model} ({source}); use at most {limit}",
        requested=requested,
        limit=limit,
    )


@dataclass(frozen=True, slots=True)
class ImageTags:
    """The text around an image's tokens in a vision-language prompt; compared by value.

    The runtime expands each ``<image>`` of the prompt to ``start`` + ``content`` × image
    tokens + ``end``. The 1.2 ABI takes them once at ``rkllm_init`` (so they belong to the
    instance, :attr:`InitParams.image_tags`); 1.3 takes them with every run.

    Attributes:
        start: the tag before an image (may be empty, as for DeepSeek-OCR).
        end: the tag after it (may be empty).
        content: the token that stands for each image token (never empty).
    """

    start: str
    end: str
    content: str

    def __post_init__(self) -> None:
        """Refuse a tag that is not a NUL-free text, and an empty ``content``."""
        for name in ("start", "end", "content"):
            check_text(getattr(self, name), f"image tag {name}")
        if not self.content:
            raise InvalidParameterError("image tag content must not be empty")


@dataclass(frozen=True, slots=True)
class InitParams:
    """Settings applied at ``rkllm_init`` on top of ``rkllm_createDefaultParam()``.

    ``None`` keeps the runtime's default.
    """

    max_context_len: int | None = None
    max_new_tokens: int | None = None
    n_keep: int | None = None
    sampling: SamplingParams = SamplingParams()
    skip_special_token: bool | None = None
    ignore_eos_token: bool | None = None
    """1.3 only."""
    enabled_cpus_num: int | None = None
    enabled_cpus_mask: int | None = None
    n_batch: int | None = None
    embed_flash: bool | None = None
    base_domain_id: int | None = None
    image_tags: ImageTags | None = None
    """The image tags of a vision-language model: set at init on 1.2 (so they are part of
    the instance); on 1.3 the default of runs that set none."""

    def __post_init__(self) -> None:
        """Validate the integer settings."""
        _check_int("max_context_len", self.max_context_len, 1, 1 << 20)
        _check_int("max_new_tokens", self.max_new_tokens, -1, 1 << 20)
        _check_int("n_keep", self.n_keep, -1, 1 << 20)
        _check_int("enabled_cpus_num", self.enabled_cpus_num, 0, 8)
        _check_int("enabled_cpus_mask", self.enabled_cpus_mask, 0, 0xFF)
        _check_int("n_batch", self.n_batch, 1, 100)  # the runtime refuses more at init
        _check_int("base_domain_id", self.base_domain_id, 0, 1 << 16)


@dataclass(frozen=True, slots=True)
class PerfStats:
    """``RKLLMPerfStat`` as reported by the runtime at the end of a run."""

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int
    memory_usage_mb: float

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prefill throughput, or 0.0 when no time was reported."""
        return self.prefill_tokens * 1000.0 / self.prefill_time_ms if self.prefill_time_ms > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput, or 0.0 when no time was reported."""
        return self.generate_tokens * 1000.0 / self.generate_time_ms if self.generate_time_ms > 0 else 0.0


class StreamChunk(NamedTuple):
    """One piece of a generation stream (a named tuple: cheap to create).

    Attributes:
        text: newly decoded text (may be empty on the final chunk).
        token_id: the token that produced this chunk, when there is one.
        finish_reason: set on the final chunk only.
        stats: the runtime's perf stats, on the final chunk when reported.
        n_tokens: how many generated tokens this chunk carries (0 on the final
            chunk). Usually 1; more when tokens arrived faster than the consumer
            read them and were merged.
    """

    text: str
    token_id: int | None = None
    finish_reason: FinishReason | None = None
    stats: PerfStats | None = None
    n_tokens: int = 1

    @property
    def is_final(self) -> bool:
        """True for the last chunk of a run."""
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Tensor:
    """A matrix of float32 values the runtime returned (hidden states or logits), copied out of its buffer.

    Attributes:
        data: ``rows * cols`` values, row-major.
        rows: the number of token positions.
        cols: the width of a row (the hidden size, or the vocabulary size).
        stats: the run's perf stats, when the runtime reported them.
    """

    data: array[float]
    rows: int
    cols: int
    stats: PerfStats | None = None

    def row(self, index: int) -> array[float]:
        """Row ``index`` (negative counts from the end) as a new array."""
        if not -self.rows <= index < self.rows:
            raise IndexError(f"row {index} of a {self.rows}-row tensor")
        start = (index % self.rows) * self.cols
        return self.data[start : start + self.cols]
