"""The server's life cycle on uvicorn: signals drain, then abort; nothing is re-raised at the end.

uvicorn's own handling re-raises the signal once it has shut down, so SIGTERM ended the process
with status 143 before the model handles were destroyed, and its first Ctrl-C waited in silence for
every generation to end. :class:`Server` takes the signals itself:

* the first SIGTERM or SIGINT stops accepting connections (uvicorn's graceful shutdown) and prints
  how many requests are finishing; after ``shutdown_timeout`` seconds those still running are
  aborted through :class:`~.deps.Stopping`, so each stream still ends cleanly;
* a second signal aborts them at once and, a moment later, stops waiting for their connections.

It returns normally in both cases, so the caller closes the model manager and picks the exit status
(:attr:`Server.exit_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Generator
from types import FrameType

import uvicorn

from .deps import ServerState

__all__ = ["EXIT_ABORTED", "Server"]

EXIT_ABORTED = 130
"""Exit status when a second signal aborted the requests in flight (128 + SIGINT, as a shell reports Ctrl-C)."""

_FORCE_AFTER = 1.0
"""Seconds an abort by a second signal leaves the aborted streams to send their end."""

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server(uvicorn.Server):
    """uvicorn's server with this life cycle (see the module's docs).

    Args:
        config: uvicorn's configuration (its ``timeout_graceful_shutdown`` is the last resort,
            after ``shutdown_timeout``).
        state: the app's state: its requests in progress and its abort switch.
        shutdown_timeout: seconds in-flight requests may take after the first signal.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def exit_status(self) -> int:
        """0, or :data:`EXIT_ABORTED` when a second signal aborted the requests in flight."""
        return EXIT_ABORTED if self.signals > 1 else 0

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        """Serve until a signal (or ``should_exit``), then shut down as described above."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Take SIGINT and SIGTERM while serving; unlike uvicorn, do not raise them again afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler: only flags and hand-offs to the event loop (no I/O in a handler)."""
        self.signals += 1
        self.should_exit = True
        if self._loop is None:
            return
        if self.signals == 1:
            self._loop.call_soon_threadsafe(self._drain)
        elif self.signals == 2:
            self._loop.call_soon_threadsafe(self._abort, True)

    def _drain(self) -> None:
        _say(f"finishing {self.state.active} requests (Ctrl-C again to abort)")
        assert self._loop is not None
        self._loop.call_later(self.shutdown_timeout, self._abort, False)

    def _abort(self, forced: bool) -> None:
        if self.state.stopping.aborted:
            return
        if self.state.active:
            why = "on a second signal" if forced else f"after {self.shutdown_timeout:g} s"
            _say(f"aborting {self.state.active} requests {why}")
        self.state.stopping.abort()
        if forced:
            assert self._loop is not None
            self._loop.call_later(_FORCE_AFTER, setattr, self, "force_exit", True)


def _say(line: str) -> None:
    print(f"rkllm serve: {line}", file=sys.stdout, flush=True)  # noqa: T201 - the server's console
