"""Loading feedback for the command line: ``loading qwen3-0.6b (890 MB)… 2.1 s`` on stderr.

Loading a model takes seconds on a board; a command that loads one says so,
through :meth:`ModelManager.on_load <rkllm_core.models.manager.ModelManager.on_load>`,
whichever step of the command does the loading.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from ..models.manager import LoadEvent, ModelManager

__all__ = ["LoadFeedback", "show_loads"]


class LoadFeedback:
    """Prints one line per model load: the name and size when it starts, the seconds when it ends.

    Args:
        out: where to print (the command's stderr).
        before: called before a load's line starts (a progress bar ends its line there).
    """

    def __init__(self, out: TextIO, before: Callable[[], None] | None = None) -> None:
        self._out = out
        self._before = before
        self._lock = threading.Lock()
        self._open: str | None = None  # the model whose line waits for its time

    def __call__(self, event: LoadEvent) -> None:
        """Show one load event."""
        with self._lock:
            if event.phase == "start":
                self._finish_line()
                if self._before is not None:
                    self._before()
                self._out.write(f"loading {event.name} ({event.size_mb:.0f} MB)… ")
                self._open = event.name
            elif event.phase == "done":
                took = f"{event.seconds:.1f} s" if event.seconds is not None else "done"
                self._write_end(event.name, took)
            else:
                self._write_end(event.name, "failed")  # the command reports the error itself
            self._out.flush()

    def _write_end(self, name: str, text: str) -> None:
        if self._open != name:  # another line came between: name the model again
            self._finish_line()
            self._out.write(f"loading {name}… ")
        self._out.write(text + "\n")
        self._open = None

    def _finish_line(self) -> None:
        if self._open is not None:
            self._out.write("\n")
            self._open = None


@contextlib.contextmanager
def show_loads(
    manager: ModelManager, out: TextIO | None = None, before: Callable[[], None] | None = None
) -> Iterator[None]:
    """Print the loads ``manager`` does while the block runs.

    Args:
        manager: the manager whose loads to show.
        out: where to print (default: stderr).
        before: called before each load's line starts.
    """
    unsubscribe = manager.on_load(LoadFeedback(out if out is not None else sys.stderr, before))
    try:
        yield
    finally:
        unsubscribe()
