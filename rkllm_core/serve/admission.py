"""The admission line: how many requests each model may have in flight before a new one is refused.

Pure bookkeeping with no I/O, so it is tested without a server. A request takes a :class:`Place`
when it is admitted and gives it back when its answer is over (a whole response sent, a stream
finished or abandoned); a place can be given back from any thread and any number of times, so
every path that may end a request simply releases it.
"""

from __future__ import annotations

import threading
from types import TracebackType

from ..errors import BusyError

__all__ = ["AdmissionLine", "Place"]


class Place:
    """One request's place in a model's line; usable as a context manager."""

    __slots__ = ("_line", "_released", "model")

    def __init__(self, line: AdmissionLine, model: str) -> None:
        self._line = line
        self._released = False
        self.model = model

    @property
    def released(self) -> bool:
        """Whether the place was given back."""
        return self._released

    def release(self) -> None:
        """Give the place back (again: nothing happens)."""
        self._line._leave(self)

    def __enter__(self) -> Place:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class AdmissionLine:
    """Per-model counts of requests in flight (running or waiting for the NPU), each bounded.

    Args:
        limit: requests one model may have in flight; the next one gets :class:`BusyError`.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # places are given back from response threads too
        self._in_flight: dict[str, int] = {}

    def enter(self, model: str) -> Place:
        """Take a place in ``model``'s line (``model``: the resolved name, so aliases share one line).

        Raises:
            BusyError: ``model`` already has ``limit`` requests in flight (``reason="busy"``).
        """
        with self._lock:
            count = self._in_flight.get(model, 0)
            if count >= self.limit:
                raise BusyError(f"{count} requests for {model} are already in line; try again shortly", reason="busy")
            self._in_flight[model] = count + 1
        return Place(self, model)

    def in_flight(self, model: str) -> int:
        """Requests ``model`` has in flight now."""
        with self._lock:
            return self._in_flight.get(model, 0)

    def _leave(self, place: Place) -> None:
        with self._lock:
            if place._released:
                return
            place._released = True
            left = self._in_flight[place.model] - 1
            if left:
                self._in_flight[place.model] = left
            else:
                del self._in_flight[place.model]
