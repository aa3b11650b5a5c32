"""The whole text pipeline: stop sequences, then reasoning, then tool calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .events import (
    Event,
    InvalidToolCall,
    ReasoningDelta,
    StopHit,
    StreamClosedError,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)
from .stops import StopSequenceFilter
from .think import ThinkSplitter
from .toolcalls import ToolCallParser

__all__ = ["StreamPipeline"]


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
