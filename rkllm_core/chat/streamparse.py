"""Incremental processing of the text the runtime streams: stops, reasoning, tool calls.

The runtime hands out decoded text deltas of any size (one character, one
token, or more). :class:`StreamPipeline` turns that stream into typed events:

* :class:`TextDelta` -- answer text;
* :class:`ReasoningDelta` -- text inside ``<think>...</think>``;
* :class:`ToolCallDelta` -- a partial tool call, for streaming UIs;
* :class:`ToolCall` / :class:`InvalidToolCall` -- a complete Qwen-style
  ``<tool_call>{...}</tool_call>`` block, parsed or reported as malformed;
* :class:`StopHit` -- a stop sequence matched; the caller must abort the run.

Every stage is pure (no I/O, no threads) and incremental: it keeps only the
short tail that could still be the beginning of a tag or a stop sequence and
never re-scans text it has already released. The output does not depend on how
the input was chunked: feeding ``"<th" + "ink>"`` gives the same events as
``"<think>"`` (adjacent deltas of one kind may be split differently).

Each stage counts the characters it examines in ``chars_scanned``; the tests
use it to prove the work per chunk is bounded (no quadratic re-scanning).

Instances handle one stream: ``feed`` pieces as they arrive, then ``flush``
once at the end. Feeding after ``flush`` raises :class:`StreamClosedError`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from ..errors import InvalidParameterError, RKLLMError

__all__ = [
    "MAX_STOP_SEQUENCES",
    "Event",
    "InvalidToolCall",
    "ReasoningDelta",
    "StopHit",
    "StopSequenceFilter",
    "StreamClosedError",
    "StreamPipeline",
    "TextDelta",
    "ThinkSplitter",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
]

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES: Final = 16
"""Most stop sequences one stream accepts (the limit common chat APIs use)."""

THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"
TOOL_OPEN: Final = "<tool_call>"
TOOL_CLOSE: Final = "</tool_call>"

# Tool-call JSON whose "name" comes first lets the name (and then the raw
# arguments) be streamed before the block closes. The match ends at the colon
# after the arguments key, so it is the same whether the text arrived at once or
# piece by piece. Only the first _NAME_WINDOW characters of a block are searched.
_EARLY_NAME_RE: Final = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:',
    re.DOTALL,
)
_NAME_WINDOW: Final = 512
_WS_RE: Final = re.compile(r"\s*")
_IN_STRING_RE: Final = re.compile(r'["\\]')
_IN_OBJECT_RE: Final = re.compile(r'[{}"]')


class StreamClosedError(RKLLMError, RuntimeError):
    """Text was fed to a stream processor after its ``flush()``."""


# --------------------------------------------------------------------------- events


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


_ToolOut: TypeAlias = list[TextDelta | ToolCallDelta | ToolCall | InvalidToolCall]

Event: TypeAlias = TextDelta | ReasoningDelta | ToolCallDelta | ToolCall | InvalidToolCall | StopHit
"""Any event :class:`StreamPipeline` emits."""


# --------------------------------------------------------------------------- helpers


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


def _default_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# --------------------------------------------------------------------------- stops


class StopSequenceFilter:
    """Cut a text stream at the first stop sequence, holding back possible stop prefixes.

    Text is released as soon as it cannot be part of a stop sequence; a suffix
    that could still grow into one is held back until the next ``feed`` (or
    ``flush``). When several stop sequences match, the one that is complete
    first wins (the earliest end; at equal ends the longer one), which is what
    a token-by-token stream sees, so the result does not depend on chunking.

    Per ``feed``, the work is ``O((len(text) + L) * n)`` for ``n`` stops of
    length at most ``L``: only the new text plus the held-back tail (shorter
    than ``L``) is searched, never the whole stream.

    Args:
        stops: the stop sequences: non-empty strings, at most
            :data:`MAX_STOP_SEQUENCES` (16, the limit common chat APIs use).
            Duplicates are ignored.

    Raises:
        InvalidParameterError: a stop is empty or not a string, ``stops`` is
            a bare string, or there are more than 16.
    """

    __slots__ = ("_buf", "_closed", "_first_re", "_hit", "_max_len", "_prefixes", "_scanned", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            raise InvalidParameterError("stops must be a sequence of strings, not a single string")
        stop_list = list(stops)
        if len(stop_list) > MAX_STOP_SEQUENCES:
            raise InvalidParameterError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stop_list)}"
            )
        for i, stop in enumerate(stop_list):
            if not isinstance(stop, str):
                raise InvalidParameterError(f"stop sequence #{i} must be a string, got {type(stop).__name__}")
            if not stop:
                raise InvalidParameterError(f"stop sequence #{i} is empty; stop sequences must be non-empty")
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop_list))
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        first_chars = "".join(sorted({s[0] for s in self._stops if len(s) > 1}))
        self._first_re = re.compile("[" + re.escape(first_chars) + "]") if first_chars else None
        self._buf = ""
        self._hit: str | None = None
        self._closed = False
        self._scanned = 0

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop sequences, duplicates removed."""
        return self._stops

    @property
    def hit(self) -> str | None:
        """The stop sequence that matched, or ``None``."""
        return self._hit

    @property
    def chars_scanned(self) -> int:
        """Characters examined so far (a diagnostic for bounded per-chunk work)."""
        return self._scanned

    def feed(self, text: str) -> str:
        """Take the next piece of the stream; return the text that is safe to emit.

        Args:
            text: the next piece of the stream.

        Returns:
            Text that cannot be part of a stop sequence. After a stop sequence
            matched: the text before it, then ``""`` for every later call.

        Raises:
            StreamClosedError: ``flush()`` was already called.
        """
        if self._closed:
            raise StreamClosedError("feed() after flush(); use a new StopSequenceFilter per stream")
        if self._hit is not None:
            return ""
        if not self._stops:
            return text
        s = self._buf + text if self._buf else text
        if not s:
            return ""
        best: str | None = None
        best_start = 0
        best_end = len(s)
        for stop in self._stops:
            self._scanned += best_end
            i = s.find(stop, 0, best_end)
            if i < 0:
                continue
            end = i + len(stop)
            if best is None or end < best_end or (end == best_end and i < best_start):
                best, best_start, best_end = stop, i, end
        if best is not None:
            self._hit = best
            self._buf = ""
            logger.debug("stop sequence %r matched", best)
            return s[:best_start]
        hold = self._hold_length(s)
        if hold:
            self._buf = s[-hold:]
            return s[:-hold]
        self._buf = ""
        return s

    def _hold_length(self, s: str) -> int:
        """Length of the longest suffix of ``s`` that is a proper prefix of a stop."""
        if self._first_re is None:
            return 0
        start = max(0, len(s) - self._max_len + 1)
        self._scanned += len(s) - start
        m = self._first_re.search(s, start)
        while m is not None:
            p = m.start()
            self._scanned += len(s) - p
            if s[p:] in self._prefixes:
                return len(s) - p
            m = self._first_re.search(s, p + 1)
        return 0

    def flush(self) -> str:
        """End the stream; return the text still held back (``""`` after a match).

        Returns:
            The held-back tail, which turned out not to be a stop sequence.
        """
        self._closed = True
        out, self._buf = self._buf, ""
        return "" if self._hit is not None else out


# --------------------------------------------------------------------------- think


# ThinkSplitter phases.
_LEAD: Final = 0  # matching the optional opening block at the start of the output
_THINK: Final = 1  # inside <think>: reasoning until </think>
_AFTER: Final = 2  # just after </think>: dropping whitespace
_BODY: Final = 3  # answer text: passed through untouched

_WS: Final = ""  # pattern token: a run of optional whitespace


class ThinkSplitter:
    r"""Separate ``<think>...</think>`` reasoning from the answer, incrementally.

    Decisions:

    * The think block is recognised only at the start of the output (after
      optional whitespace), as the reasoning models emit it. Once answer text
      has begun, ``<think>`` is ordinary text; there is one block per reply.
    * Tags are removed. Leading whitespace of the reasoning and of the answer
      after ``</think>`` is dropped (models emit ``<think>\n`` and
      ``</think>\n\n``); other text is kept verbatim.
    * Only what could still be a tag is held back: at the start, leading
      whitespace plus a possible ``<think>`` prefix; inside the block, a possible
      ``</think>`` prefix (at most 7 characters). After the block, text passes
      through with no scanning at all.
    * A ``<think>`` block that never closes is all reasoning.
    * With ``enabled=False`` the text is answer text, except that an empty
      ``<think></think>`` block (only whitespace inside) at the start is dropped
      together with the whitespace after it. A non-empty block is kept as text.

    Args:
        enabled: whether the reply is expected to contain reasoning.
        start_in_think: the prompt template already opened the think block
            (DeepSeek-R1 style), so the output starts inside it and has only
            ``</think>``. A repeated ``<think>`` at the very start is dropped.
            Ignored when ``enabled`` is False.
    """

    __slots__ = (
        "_closed",
        "_enabled",
        "_held",
        "_lit",
        "_pattern",
        "_phase",
        "_reasoning_started",
        "_scanned",
        "_start_in_think",
        "_tag",
        "_tok",
    )

    def __init__(self, enabled: bool, start_in_think: bool = False) -> None:
        self._enabled = bool(enabled)
        self._start_in_think = bool(start_in_think) and self._enabled
        if self._enabled:
            self._pattern: tuple[str, ...] = (_WS, THINK_OPEN)
        else:
            self._pattern = (_WS, THINK_OPEN, _WS, THINK_CLOSE)
        self._phase = _LEAD
        self._tok = 0  # index into _pattern
        self._lit = 0  # characters of the current literal already matched
        self._held: list[str] = []  # raw text consumed while matching the pattern
        self._tag = ""  # held-back possible "</think>" prefix, inside the block
        self._reasoning_started = False
        self._closed = False
        self._scanned = 0

    @property
    def in_think(self) -> bool:
        """True while the text being read is reasoning (inside the think block)."""
        return self._phase == _THINK or (self._phase == _LEAD and self._start_in_think)

    @property
    def chars_scanned(self) -> int:
        """Characters examined so far (a diagnostic for bounded per-chunk work)."""
        return self._scanned

    def feed(self, text: str) -> list[TextDelta | ReasoningDelta]:
        """Take the next piece of the stream.

        Args:
            text: the next piece of the stream.

        Returns:
            The events this piece completes, in order.

        Raises:
            StreamClosedError: ``flush()`` was already called.
        """
        if self._closed:
            raise StreamClosedError("feed() after flush(); use a new ThinkSplitter per stream")
        if self._phase == _BODY:
            return [TextDelta(text)] if text else []
        out: list[TextDelta | ReasoningDelta] = []
        if self._phase == _LEAD:
            text = self._feed_lead(text, out)
        if self._phase == _THINK and text:
            text = self._feed_think(text, out)
        if self._phase == _AFTER and text:
            text = text.lstrip()
            self._scanned += 1
            if text:
                self._phase = _BODY
        if self._phase == _BODY and text:
            out.append(TextDelta(text))
        return out

    def _feed_lead(self, text: str, out: list[TextDelta | ReasoningDelta]) -> str:
        """Match the opening pattern; return the text left for the next phase."""
        pattern = self._pattern
        pos = 0
        n = len(text)
        while self._tok < len(pattern):
            tok = pattern[self._tok]
            if tok == _WS:
                end = _skip_ws(text, pos)
                self._scanned += end - pos + 1
                pos = end
                if pos == n:
                    self._held.append(text)
                    return ""
                self._tok += 1
                continue
            need = tok[self._lit :]
            got = text[pos : pos + len(need)]
            self._scanned += len(got)
            if not need.startswith(got):
                return self._lead_failed(text, out)
            if len(got) < len(need):
                self._lit += len(got)
                self._held.append(text)
                return ""
            pos += len(need)
            self._lit = 0
            self._tok += 1
        # the whole pattern matched
        self._held.clear()
        if self._enabled:
            self._phase = _THINK
        else:
            logger.debug("dropped an empty think block")
            self._phase = _AFTER
        return text[pos:]

    def _lead_failed(self, text: str, out: list[TextDelta | ReasoningDelta]) -> str:
        """The start is not the expected tag: release what was held for the next phase."""
        held = "".join(self._held) + text
        self._held.clear()
        if self._start_in_think:
            self._phase = _THINK
            return held
        self._phase = _BODY
        if held:
            out.append(TextDelta(held))
        return ""

    def _feed_think(self, text: str, out: list[TextDelta | ReasoningDelta]) -> str:
        s = self._tag + text if self._tag else text
        self._scanned += len(s)
        i = s.find(THINK_CLOSE)
        if i >= 0:
            self._tag = ""
            self._emit_reasoning(s[:i], out)
            self._phase = _AFTER
            return s[i + len(THINK_CLOSE) :]
        self._tag = _tag_tail(s, THINK_CLOSE)
        self._emit_reasoning(s[: len(s) - len(self._tag)], out)
        return ""

    def _emit_reasoning(self, r: str, out: list[TextDelta | ReasoningDelta]) -> None:
        if not self._reasoning_started:
            r = r.lstrip()
            if not r:
                return
            self._reasoning_started = True
        if r:
            out.append(ReasoningDelta(r))

    def flush(self) -> list[TextDelta | ReasoningDelta]:
        """End the stream; return events for any text still held back.

        Returns:
            The last events: held text at the start (answer text, or reasoning
            when ``start_in_think``), or a held ``</think>`` prefix of an
            unclosed block (reasoning).
        """
        if self._closed:
            return []
        self._closed = True
        out: list[TextDelta | ReasoningDelta] = []
        if self._phase == _LEAD:
            held = "".join(self._held)
            self._held.clear()
            if self._start_in_think:
                self._emit_reasoning(held, out)
            elif held:
                out.append(TextDelta(held))
        elif self._phase == _THINK:
            tag, self._tag = self._tag, ""
            self._emit_reasoning(tag, out)
        return out


# --------------------------------------------------------------------------- tool calls


# _Block argument-streaming modes.
_ARGS_WAIT_NAME: Final = 0  # the early name pattern has not matched (yet)
_ARGS_SKIP_WS: Final = 1  # name seen; skipping whitespace before the arguments value
_ARGS_OBJECT: Final = 2  # streaming the raw text of the arguments object
_ARGS_DONE: Final = 3  # the arguments object closed; everything was streamed
_ARGS_AT_CLOSE: Final = 4  # not streamable (string, or name not first): sent when the block closes


@dataclass(slots=True)
class _Block:
    """State of the ``<tool_call>`` block being read."""

    index: int
    id: str
    parts: list[str] = field(default_factory=list)
    head: str = ""  # the first _NAME_WINDOW characters
    length: int = 0
    name: str | None = None  # the name, once sent in a ToolCallDelta
    mode: int = _ARGS_WAIT_NAME
    depth: int = 0
    in_string: bool = False
    escape: bool = False


class ToolCallParser:
    """Find Qwen-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

    Text outside the blocks is passed through as :class:`TextDelta`. For each
    block:

    * :class:`ToolCallDelta` events as the text arrives: when the JSON starts
      with ``"name"`` followed by an ``"arguments"`` object, the first delta
      carries id and name as soon as both are read, and later deltas the raw
      text of the arguments object, ending where the object closes. Otherwise
      (arguments given first, or as a string) one delta with the name and the
      re-encoded arguments is sent when the block closes.
    * A :class:`ToolCall` when ``</tool_call>`` closes the block, or an
      :class:`InvalidToolCall` if its JSON is malformed, has no name, or its
      arguments are not an object. Nothing is ever raised for model output.

    Accepted: ``"arguments"`` or ``"parameters"``; either as an object or as a
    string containing a JSON object; missing or ``null`` arguments mean ``{}``;
    the OpenAI shape ``{"function": {"name": ..., "arguments": ...}}``; a
    Markdown code fence around the JSON. A block still open at ``flush`` is an
    :class:`InvalidToolCall`.

    Whitespace next to a block is dropped: whitespace-only text between, before
    or after blocks, the trailing whitespace of text before a block and the
    leading whitespace of text after one. To do this, trailing whitespace of
    plain text is held back until more text arrives (or ``flush``); otherwise
    only a possible tag prefix (at most 11 characters) is held back.

    Args:
        id_factory: makes a call id for each block; by default ``"call_"``
            followed by 24 hex digits of a random UUID.
    """

    __slots__ = ("_block", "_closed", "_new_id", "_next_index", "_scanned", "_strip_leading", "_tag", "_ws")

    def __init__(self, id_factory: Callable[[], str] | None = None) -> None:
        self._new_id: Callable[[], str] = id_factory or _default_call_id
        self._block: _Block | None = None
        self._ws: list[str] = []  # trailing whitespace of the text, held back
        self._tag = ""  # held-back possible tag prefix (open or close, by state)
        self._strip_leading = False  # drop whitespace until real text (after a block)
        self._next_index = 0
        self._closed = False
        self._scanned = 0

    @property
    def in_tool_call(self) -> bool:
        """True while inside a ``<tool_call>`` block."""
        return self._block is not None

    @property
    def chars_scanned(self) -> int:
        """Characters examined so far (a diagnostic for bounded per-chunk work)."""
        return self._scanned

    def feed(self, text: str) -> list[TextDelta | ToolCallDelta | ToolCall | InvalidToolCall]:
        """Take the next piece of answer text.

        Args:
            text: the next piece of answer text.

        Returns:
            The events this piece completes, in order.

        Raises:
            StreamClosedError: ``flush()`` was already called.
        """
        if self._closed:
            raise StreamClosedError("feed() after flush(); use a new ToolCallParser per stream")
        out: list[TextDelta | ToolCallDelta | ToolCall | InvalidToolCall] = []
        rest: str | None = text
        while rest:
            rest = self._feed_block(rest, out) if self._block is not None else self._feed_text(rest, out)
        return out

    # -- outside blocks

    def _emit_text(self, t: str, out: _ToolOut) -> None:
        if self._strip_leading:
            t = t.lstrip()
            if not t:
                return
            self._strip_leading = False
        out.append(TextDelta(t))

    def _feed_text(self, text: str, out: _ToolOut) -> str | None:
        s = self._tag + text if self._tag else text
        self._tag = ""
        self._scanned += len(s)
        i = s.find(TOOL_OPEN)
        if i >= 0:
            body = s[:i].rstrip()
            self._scanned += i - len(body)
            if body:
                self._emit_text("".join(self._ws) + body, out)
            self._ws.clear()
            self._open_block()
            return s[i + len(TOOL_OPEN) :]
        self._tag = _tag_tail(s, TOOL_OPEN)
        body = s[: len(s) - len(self._tag)] if self._tag else s
        core = body.rstrip()
        self._scanned += len(body) - len(core) + 1
        if core:
            if self._ws:
                self._emit_text("".join(self._ws) + core, out)
                self._ws.clear()
            else:
                self._emit_text(core, out)
            if len(core) < len(body):
                self._ws.append(body[len(core) :])
        elif body and not self._strip_leading:
            self._ws.append(body)
        return None

    def _open_block(self) -> None:
        self._block = _Block(index=self._next_index, id=self._new_id())
        self._next_index += 1

    # -- inside a block

    def _feed_block(self, text: str, out: _ToolOut) -> str | None:
        block = self._block
        assert block is not None
        s = self._tag + text if self._tag else text
        self._tag = ""
        self._scanned += len(s)
        i = s.find(TOOL_CLOSE)
        if i >= 0:
            self._append(block, s[:i], out)
            self._close_block(block, out)
            return s[i + len(TOOL_CLOSE) :]
        self._tag = _tag_tail(s, TOOL_CLOSE)
        self._append(block, s[: len(s) - len(self._tag)] if self._tag else s, out)
        return None

    def _append(self, block: _Block, piece: str, out: _ToolOut) -> None:
        """Add block text; stream the name and the raw arguments where possible."""
        if not piece:
            return
        block.parts.append(piece)
        old_len = block.length
        block.length += len(piece)
        if old_len < _NAME_WINDOW:
            block.head += piece[: _NAME_WINDOW - old_len]
        first = False
        new_args = ""
        if block.mode == _ARGS_WAIT_NAME:
            if old_len >= _NAME_WINDOW:
                block.mode = _ARGS_AT_CLOSE
                return
            if ":" not in piece:
                return
            self._scanned += len(block.head)
            m = _EARLY_NAME_RE.match(block.head)
            if m is None:
                return
            try:
                name = json.loads('"' + m.group(1) + '"')
            except ValueError:
                block.mode = _ARGS_AT_CLOSE
                return
            if not name:
                block.mode = _ARGS_AT_CLOSE
                return
            block.name = name
            block.mode = _ARGS_SKIP_WS
            first = True
            piece = "".join(block.parts)[m.end() :]
        if block.mode in (_ARGS_SKIP_WS, _ARGS_OBJECT):
            new_args = self._scan_args(block, piece)
        if first or new_args:
            out.append(
                ToolCallDelta(
                    index=block.index,
                    id=block.id if first else None,
                    name=block.name if first else None,
                    arguments_delta=new_args,
                )
            )

    def _scan_args(self, block: _Block, t: str) -> str:
        """Advance over ``t`` in the arguments value; return its part of the object text."""
        if block.mode == _ARGS_SKIP_WS:
            j = _skip_ws(t, 0)
            self._scanned += j + 1
            if j == len(t):
                return ""
            if t[j] != "{":
                block.mode = _ARGS_AT_CLOSE
                return ""
            block.mode = _ARGS_OBJECT
            t = t[j:]
        self._scanned += len(t)
        pos, n = 0, len(t)
        depth, in_string, escape = block.depth, block.in_string, block.escape
        end = n
        while pos < n:
            if escape:
                escape = False
                pos += 1
            elif in_string:
                m = _IN_STRING_RE.search(t, pos)
                if m is None:
                    break
                pos = m.end()
                if m.group() == "\\":
                    escape = True
                else:
                    in_string = False
            else:
                m = _IN_OBJECT_RE.search(t, pos)
                if m is None:
                    break
                pos = m.end()
                c = m.group()
                if c == '"':
                    in_string = True
                elif c == "{":
                    depth += 1
                else:
                    depth -= 1
                    if depth == 0:
                        end = pos
                        block.mode = _ARGS_DONE
                        break
        block.depth, block.in_string, block.escape = depth, in_string, escape
        return t[:end]

    def _close_block(self, block: _Block, out: _ToolOut) -> None:
        self._block = None
        self._strip_leading = True
        raw = "".join(block.parts).strip()
        result = _parse_tool_json(raw)
        if isinstance(result, str):
            logger.debug("invalid tool call #%d: %s", block.index, result)
            out.append(InvalidToolCall(id=block.id, raw=raw, error=result, name=block.name, index=block.index))
            return
        name, arguments = result
        args_json = json.dumps(arguments, ensure_ascii=False)
        if block.name is None:
            out.append(ToolCallDelta(index=block.index, id=block.id, name=name, arguments_delta=args_json))
        elif block.mode != _ARGS_DONE:
            out.append(ToolCallDelta(index=block.index, id=None, name=None, arguments_delta=args_json))
        out.append(ToolCall(id=block.id, name=name, arguments=arguments, raw=raw, index=block.index))

    def flush(self) -> list[TextDelta | ToolCallDelta | ToolCall | InvalidToolCall]:
        """End the stream; return events for held-back text or an unclosed block.

        Returns:
            Held-back text (trailing whitespace, a partial tag) as
            :class:`TextDelta`, or an :class:`InvalidToolCall` for a block
            that never closed.
        """
        if self._closed:
            return []
        self._closed = True
        out: list[TextDelta | ToolCallDelta | ToolCall | InvalidToolCall] = []
        block = self._block
        if block is not None:
            self._block = None
            raw = ("".join(block.parts) + self._tag).strip()
            error = f"unterminated tool call: the reply ended before {TOOL_CLOSE}"
            logger.debug("invalid tool call #%d: %s", block.index, error)
            out.append(InvalidToolCall(id=block.id, raw=raw, error=error, name=block.name, index=block.index))
        else:
            rest = "".join(self._ws) + self._tag
            if rest:
                self._emit_text(rest, out)
        self._ws.clear()
        self._tag = ""
        return out


def _strip_fence(raw: str) -> str:
    """Remove a Markdown code fence around ``raw`` (already stripped)."""
    if raw.startswith("```") and raw.endswith("```") and len(raw) >= 6:
        inner = raw[3:-3]
        nl = inner.find("\n")
        if nl >= 0 and inner[:nl].strip().isidentifier():  # a language tag such as "json"
            inner = inner[nl + 1 :]
        return inner.strip()
    return raw


def _parse_tool_json(raw: str) -> tuple[str, dict[str, Any]] | str:
    """Parse a tool-call block; return ``(name, arguments)`` or an error message."""
    text = _strip_fence(raw)
    if not text:
        return "empty tool call: expected a JSON object with a name and arguments"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return f"tool call is not valid JSON: {exc}"
    if not isinstance(obj, dict):
        return f"tool call must be a JSON object, got {type(obj).__name__}"
    if "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return 'tool call has no "name" (expected a non-empty string)'
    key = "arguments" if "arguments" in obj else "parameters"
    args = obj.get(key)
    if args is None:
        return name, {}
    if isinstance(args, str):
        if not args.strip():
            return name, {}
        try:
            args = json.loads(args)
        except ValueError as exc:
            return f'tool call "{name}": {key} is a string that is not valid JSON: {exc}'
    if not isinstance(args, dict):
        return f'tool call "{name}": {key} must be a JSON object, got {type(args).__name__}'
    return name, args


# --------------------------------------------------------------------------- pipeline


class StreamPipeline:
    """The whole text pipeline: stop sequences, then reasoning, then tool calls.

    Order and decisions:

    1. Stop sequences are matched on the raw generated text, before anything
       else, as chat APIs apply them to the raw completion. So a stop string
       inside the reasoning also stops, and tags do not hide a stop. On a
       match, the text before it goes through the other stages, the stages
       are flushed, and :class:`StopHit` is the last event; the caller must
       abort the run (``stopped`` is True). Later ``feed`` calls (text the
       runtime produced before the abort took effect) return ``[]``.
    2. :class:`ThinkSplitter` separates reasoning (always run: with thinking
       disabled it still drops an empty leading ``<think></think>`` block).
    3. :class:`ToolCallParser` (if ``parse_tools``) reads the answer text only;
       ``<tool_call>`` inside reasoning stays reasoning.

    When nothing is pending (no stops, answer text started, no tool parsing),
    a ``feed`` does no scanning at all.

    Args:
        stops: stop sequences (see :class:`StopSequenceFilter`); ``None`` or
            empty for none.
        enable_thinking: expect a ``<think>`` block at the start of the reply.
        parse_tools: parse ``<tool_call>`` blocks in the answer text.
        start_in_think: the prompt opened the think block (see
            :class:`ThinkSplitter`).
        id_factory: makes tool call ids (see :class:`ToolCallParser`).

    Raises:
        InvalidParameterError: invalid stop sequences.
    """

    __slots__ = (
        "_closed",
        "_done",
        "_invalid_tool_calls",
        "_reasoning",
        "_stop",
        "_stop_hit",
        "_text",
        "_think",
        "_tool_calls",
        "_tools",
    )

    def __init__(
        self,
        stops: Sequence[str] | None = (),
        enable_thinking: bool = False,
        parse_tools: bool = False,
        start_in_think: bool = False,
        id_factory: Callable[[], str] | None = None,
    ) -> None:
        stop_filter = StopSequenceFilter(stops if stops is not None else ())
        self._stop: StopSequenceFilter | None = stop_filter if stop_filter.stops else None
        self._think = ThinkSplitter(enable_thinking, start_in_think=start_in_think)
        self._tools: ToolCallParser | None = ToolCallParser(id_factory) if parse_tools else None
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._invalid_tool_calls: list[InvalidToolCall] = []
        self._stop_hit: str | None = None
        self._done = False  # no more events: stopped or flushed
        self._closed = False  # flush() was called

    # -- results so far

    @property
    def stopped(self) -> bool:
        """True once a stop sequence matched; the caller must abort the run."""
        return self._stop_hit is not None

    @property
    def stop_hit(self) -> str | None:
        """The stop sequence that matched, or ``None``."""
        return self._stop_hit

    @property
    def text(self) -> str:
        """The answer text emitted so far (no reasoning, no tool-call blocks)."""
        if len(self._text) > 1:
            self._text[:] = ["".join(self._text)]
        return self._text[0] if self._text else ""

    @property
    def reasoning(self) -> str:
        """The reasoning text emitted so far."""
        if len(self._reasoning) > 1:
            self._reasoning[:] = ["".join(self._reasoning)]
        return self._reasoning[0] if self._reasoning else ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The complete tool calls so far (a copy)."""
        return list(self._tool_calls)

    @property
    def invalid_tool_calls(self) -> list[InvalidToolCall]:
        """The malformed tool-call blocks so far (a copy)."""
        return list(self._invalid_tool_calls)

    @property
    def chars_scanned(self) -> int:
        """Characters examined by all stages (a diagnostic for bounded per-chunk work)."""
        total = self._think.chars_scanned
        if self._stop is not None:
            total += self._stop.chars_scanned
        if self._tools is not None:
            total += self._tools.chars_scanned
        return total

    # -- streaming

    def feed(self, text: str) -> list[Event]:
        """Take the next piece of generated text.

        Args:
            text: the next decoded piece from the runtime.

        Returns:
            The events this piece completes, in order. After a stop sequence
            matched, always ``[]``.

        Raises:
            StreamClosedError: ``flush()`` was already called.
        """
        if self._closed:
            raise StreamClosedError("feed() after flush(); use a new StreamPipeline per stream")
        if self._done:
            return []
        stop = self._stop
        if stop is not None:
            text = stop.feed(text)
        out: list[Event] = []
        if text:
            self._route(self._think.feed(text), out)
        if stop is not None and stop.hit is not None:
            self._finish(out)
            self._stop_hit = stop.hit
            out.append(StopHit(stop.hit))
        return out

    def flush(self) -> list[Event]:
        """End the stream; return the events for everything still held back.

        Returns:
            The last events (``[]`` if a stop sequence already ended the stream).
        """
        self._closed = True
        out: list[Event] = []
        if self._done:
            return out
        if self._stop is not None:
            rest = self._stop.flush()
            if rest:
                self._route(self._think.feed(rest), out)
        self._finish(out)
        return out

    def _finish(self, out: list[Event]) -> None:
        self._done = True
        self._route(self._think.flush(), out)
        if self._tools is not None:
            self._record(self._tools.flush(), out)

    def _route(self, events: list[TextDelta | ReasoningDelta], out: list[Event]) -> None:
        """Pass answer text on to the tool parser; record everything."""
        tools = self._tools
        for ev in events:
            if isinstance(ev, TextDelta):
                if tools is not None:
                    self._record(tools.feed(ev.text), out)
                    continue
                self._text.append(ev.text)
            else:
                self._reasoning.append(ev.text)
            out.append(ev)

    def _record(self, events: list[TextDelta | ToolCallDelta | ToolCall | InvalidToolCall], out: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, TextDelta):
                self._text.append(ev.text)
            elif isinstance(ev, ToolCall):
                self._tool_calls.append(ev)
            elif isinstance(ev, InvalidToolCall):
                self._invalid_tool_calls.append(ev)
            out.append(ev)
