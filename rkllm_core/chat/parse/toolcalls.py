"""Tool calls: parse Qwen-style ``<tool_call>{...}</tool_call>`` JSON blocks in answer text."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from .events import InvalidToolCall, StreamClosedError, TextDelta, ToolCall, ToolCallDelta, _skip_ws, _tag_tail

__all__ = ["ToolCallParser"]

logger = logging.getLogger(__name__)

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
_IN_STRING_RE: Final = re.compile(r'["\\]')
_IN_OBJECT_RE: Final = re.compile(r'[{}"]')

_ToolOut: TypeAlias = list[TextDelta | ToolCallDelta | ToolCall | InvalidToolCall]


def _default_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


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
