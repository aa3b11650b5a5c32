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

Modules, each importing only the ones before it:

* :mod:`~rkllm_core.chat.parse.events` -- the event types, :data:`Event` and
  :class:`StreamClosedError`;
* :mod:`~rkllm_core.chat.parse.stops` -- :class:`StopSequenceFilter`;
* :mod:`~rkllm_core.chat.parse.think` -- :class:`ThinkSplitter`;
* :mod:`~rkllm_core.chat.parse.toolcalls` -- :class:`ToolCallParser`;
* :mod:`~rkllm_core.chat.parse.pipeline` -- :class:`StreamPipeline`, which
  chains the three stages.
"""

from __future__ import annotations

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
from .pipeline import StreamPipeline
from .stops import MAX_STOP_SEQUENCES, StopSequenceFilter
from .think import ThinkSplitter
from .toolcalls import ToolCallParser

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
