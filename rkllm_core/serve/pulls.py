"""Pulls for Ollama's ``/api/pull``: the code of ``rkllm pull``, on a thread of its own, as an async stream.

A pull downloads for minutes; the event loop only awaits its progress. The download
runs on a thread that belongs to the pull (never the loop's executor), and reports to
the loop through ``call_soon_threadsafe``. When the client goes away (or the server
stops) the stream is closed, and the download stops at its next progress report,
leaving its partial file hidden for the next pull to resume (:mod:`rkllm_core.hub`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Final

from ..hub import PullProgress, PullResult, parse_ref, pull

__all__ = ["PullJob"]

_EVERY_S: Final = 0.25
"""Progress lines for one file come at most this often (and at its start and end)."""


class _Stopped(Exception):
    """Raised inside the download when nobody wants it any more."""


class PullJob:
    """One pull, started at once; :meth:`events` streams its progress and ends with ``{"status": "success"}``.

    Args:
        ref: a Hugging Face reference (checked now: a malformed one raises before anything starts).
        dest: the model directory the model goes into (in a folder of its own).

    Raises:
        InvalidParameterError: ``ref`` is not a reference.
    """

    def __init__(self, ref: str, dest: Path) -> None:
        self.ref = parse_ref(ref)
        self.dest = dest
        self.result: PullResult | None = None
        self._stopped = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._last: tuple[str | None, float] = (None, 0.0)
        threading.Thread(target=self._work, name=f"rkllm-pull {self.ref}", daemon=True).start()

    def _work(self) -> None:
        try:
            self._send("done", pull(self.ref, self.dest, on_progress=self._progress))
        except _Stopped:
            pass
        except Exception as exc:
            self._send("error", exc)

    def _send(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server stopped
            self._stopped.set()

    def _progress(self, step: PullProgress) -> None:
        if self._stopped.is_set():
            raise _Stopped
        now = time.monotonic()
        file, last = self._last
        ends = step.total is not None and step.completed == step.total
        if step.completed is not None and file == step.file and now - last < _EVERY_S and not ends:
            return  # bytes arrive in small pieces: a line every quarter of a second is plenty
        self._last = (step.file, now)
        self._send("progress", step)

    async def events(self) -> AsyncGenerator[PullProgress, None]:
        """The pull's progress; ends when it is done (``result`` is set); raises what made it fail."""
        try:
            while True:
                kind, value = await self._queue.get()
                if kind == "progress":
                    yield value
                elif kind == "done":
                    self.result = value
                    return
                else:
                    raise value
        finally:
            self._stopped.set()
