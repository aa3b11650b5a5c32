"""Reasoning: split a leading ``<think>...</think>`` block from the answer text."""

from __future__ import annotations

import logging
from typing import Final

from .events import ReasoningDelta, StreamClosedError, TextDelta, _skip_ws, _tag_tail

__all__ = ["ThinkSplitter"]

logger = logging.getLogger(__name__)

THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"

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
