"""Stop sequences: cut a text stream at the first match, whatever the chunking."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Final

from ...errors import InvalidParameterError
from .events import StreamClosedError

__all__ = ["MAX_STOP_SEQUENCES", "StopSequenceFilter"]

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES: Final = 16
"""Most stop sequences one stream accepts (the limit common chat APIs use)."""


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
