"""The events the stream processors emit, their shared error, and helpers they share.

Every processor in :mod:`rkllm_core.chat.parse` turns text into these frozen
dataclasses; :data:`Event` is the union :class:`StreamPipeline` emits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from ...errors import RKLLMError

__all__ = [
    "Event",
    "InvalidToolCall",
    "ReasoningDelta",
    "StopHit",
    "StreamClosedError",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
]

_WS_RE: Final = re.compile(r"\s*")


class StreamClosedError(RKLLMError, RuntimeError):
    """Text was fed to a stream processor after its ``flush()``."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of answer text.

    Attributes:
        text: the text; never empty.
    """

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of reasoning: text between ``<think>`` and ``</think>`` (tags removed).

    Attributes:
        text: the text; never empty.
    """

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A partial tool call, for streaming UIs (LangChain's ``tool_call_chunks``).

    Follows the OpenAI streaming convention: the first delta of a call carries
    ``id`` and ``name``; later deltas of the same ``index`` carry ``None`` there
    and only more ``arguments_delta`` text. Concatenating every
    ``arguments_delta`` of a valid call gives JSON text of its arguments object.

    Attributes:
        index: position of the call in the reply (0, 1, ...).
        id: the call id on the first delta of a call, else ``None``.
        name: the function name on the first delta of a call, else ``None``.
        arguments_delta: more raw JSON text of the arguments (may be empty).
    """

    index: int
    id: str | None
    name: str | None
    arguments_delta: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete, well-formed tool call, emitted when ``</tool_call>`` closes its block.

    Attributes:
        id: the call id (generated; the same as on its :class:`ToolCallDelta`).
        name: the function name.
        arguments: the arguments object, decoded.
        raw: the block's text between the tags, surrounding whitespace removed.
        index: position of the call in the reply (0, 1, ...).
    """

    id: str
    name: str
    arguments: dict[str, Any]
    raw: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class InvalidToolCall:
    """A ``<tool_call>`` block that could not be parsed. Reported, never raised.

    Attributes:
        id: the call id the block was given.
        raw: the block's text between the tags, surrounding whitespace removed.
        error: what is wrong, for the model or the user to read.
        name: the function name if one could be read, else ``None``.
        index: position of the block in the reply (0, 1, ...).
    """

    id: str
    raw: str
    error: str
    name: str | None = None
    index: int = 0


@dataclass(frozen=True, slots=True)
class StopHit:
    """A stop sequence matched; nothing after it is emitted and the run should be aborted.

    Attributes:
        stop: the stop sequence that matched.
    """

    stop: str


Event: TypeAlias = TextDelta | ReasoningDelta | ToolCallDelta | ToolCall | InvalidToolCall | StopHit
"""Any event :class:`StreamPipeline` emits."""


def _tag_tail(s: str, tag: str) -> str:
    """Return the suffix of ``s`` that is a proper prefix of ``tag`` (tags hold one ``<``)."""
    p = s.rfind("<", max(0, len(s) - len(tag) + 1))
    if p >= 0 and tag.startswith(s[p:]):
        return s[p:]
    return ""


def _skip_ws(s: str, pos: int) -> int:
    """Index of the first non-whitespace character of ``s`` at or after ``pos`` (or ``len(s)``)."""
    m = _WS_RE.match(s, pos)
    return m.end() if m is not None else pos
