"""How many models a manager keeps loaded when nobody says: as many as fit in memory.

A manager created without ``max_loaded`` / ``memory_budget_mb`` (the process-wide
default manager, the adapters' managers) takes its budget from, in order:

1. ``RKLLM_MAX_LOADED`` (a count, or ``none``) and ``RKLLM_MEMORY_BUDGET_MB`` (MB, or
   ``none``);
2. the memory available when the manager is made (``MemAvailable``), with the
   estimate the pre-flight check uses for one load (the file, 10 % more, and a
   margin), so models are kept while their files fit;
3. when the available memory cannot be read, two models.

On the simulator, whose model files are sparse stand-ins, a budget taken from
memory always leaves room for at least two models. The line still frees memory
the system lacks before a load (see :mod:`rkllm_core.models.line`), so a budget
from a snapshot never overcommits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final, Literal

from .. import preflight
from ..errors import InvalidParameterError

__all__ = ["AUTO", "ENV_MAX_LOADED", "ENV_MEMORY_BUDGET_MB", "Budget", "resolve_budget"]

ENV_MAX_LOADED: Final = "RKLLM_MAX_LOADED"
ENV_MEMORY_BUDGET_MB: Final = "RKLLM_MEMORY_BUDGET_MB"
AUTO: Final = "auto"
FALLBACK_MAX_LOADED: Final = 2
_NO_LIMIT: Final = ("none", "unlimited", "inf")


@dataclass(frozen=True, slots=True)
class Budget:
    """A manager's budget and where it came from (for logs and ``rkllm info``)."""

    max_loaded: int | None
    memory_budget_mb: float | None
    source: str
    from_memory: bool = False

    def describe(self) -> str:
        """``up to 2 models`` / ``up to 6900 MB of models`` / ``no limit``, and why."""
        parts = []
        if self.max_loaded is not None:
            parts.append(f"{self.max_loaded} model{'s' if self.max_loaded != 1 else ''}")
        if self.memory_budget_mb is not None:
            parts.append(f"{self.memory_budget_mb:.0f} MB of models")
        return f"{'up to ' + ' and '.join(parts) if parts else 'no limit'} ({self.source})"


def _env_count(environ: dict[str, str] | os._Environ[str]) -> int | None | Literal["auto"]:
    raw = environ.get(ENV_MAX_LOADED, "").strip()
    if not raw:
        return AUTO
    if raw.lower() in _NO_LIMIT:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidParameterError(f"{ENV_MAX_LOADED} must be a whole number of models >= 1 or 'none', got {raw!r}")
    return int(raw)


def _env_mb(environ: dict[str, str] | os._Environ[str]) -> float | None | Literal["auto"]:
    raw = environ.get(ENV_MEMORY_BUDGET_MB, "").strip()
    if not raw:
        return AUTO
    if raw.lower() in _NO_LIMIT:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise InvalidParameterError(f"{ENV_MEMORY_BUDGET_MB} must be a number of MB > 0 or 'none', got {raw!r}")
    return value


def _from_memory(root: str | os.PathLike[str]) -> float | None:
    """MB of model files that fit in the memory available now (the pre-flight rule, inverted)."""
    available = preflight.memory_available_mb(root)
    if available is None:
        return None
    room = (available - preflight.MEMORY_MARGIN_MB) / preflight.MEMORY_FACTOR
    return max(room, 1.0)


def resolve_budget(
    max_loaded: int | None | Literal["auto"],
    memory_budget_mb: float | None | Literal["auto"],
    *,
    environ: dict[str, str] | os._Environ[str] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> Budget:
    """Fill in what was left ``"auto"``: from the environment, else from the available memory.

    Args:
        max_loaded: a count, ``None`` (no limit) or ``"auto"``.
        memory_budget_mb: MB, ``None`` (no limit) or ``"auto"``.
        environ: the environment (default ``os.environ``).
        root: where ``proc/meminfo`` is read (default the pre-flight check's root).

    Raises:
        InvalidParameterError: an environment variable that is not a valid budget.
    """
    env = os.environ if environ is None else environ
    count, mb = max_loaded, memory_budget_mb
    sources: list[str] = []
    if count == AUTO and (value := _env_count(env)) != AUTO:
        count, sources = value, [*sources, ENV_MAX_LOADED]
    if mb == AUTO and (value_mb := _env_mb(env)) != AUTO:
        mb, sources = value_mb, [*sources, ENV_MEMORY_BUDGET_MB]
    if mb == AUTO:
        mb = None if count != AUTO else _from_memory(root if root is not None else preflight.SYSTEM_ROOT)
        if mb is not None:
            sources.append("the memory available now")
    if count == AUTO:
        count = None if mb is not None else FALLBACK_MAX_LOADED
        if count is not None:
            sources.append("available memory unknown")
    assert not isinstance(count, str) and not isinstance(mb, str)
    return Budget(count, mb, ", ".join(sources) or "as given", "the memory available now" in sources)


SWAP_WINDOW_S: Final = 60.0
SWAP_WARN_AFTER: Final = 3


class SwapWatch:
    """Notices models that keep swapping each other out, and says so at most once a window.

    A *swap-back* is a load of a model that the budget unloaded less than
    ``window_s`` ago. ``SWAP_WARN_AFTER`` swap-backs within a window give one
    message naming the models; the next can come a window later.

    Args:
        window_s: the window, in seconds.
        warn_after: swap-backs within a window that make a message.
    """

    def __init__(self, window_s: float = SWAP_WINDOW_S, warn_after: int = SWAP_WARN_AFTER) -> None:
        self.window_s = window_s
        self.warn_after = warn_after
        self._evicted: dict[str, float] = {}  # model -> when the budget last unloaded it
        self._backs: list[tuple[float, str]] = []  # recent swap-backs
        self._warned_at: float | None = None

    def evicted(self, name: str, now: float) -> None:
        """The budget unloaded ``name`` to make room for another model."""
        self._evicted[name] = now

    def loaded(self, name: str, now: float) -> str | None:
        """``name`` was loaded; return a warning when models keep swapping (at most once a window)."""
        when = self._evicted.pop(name, None)
        if when is None or now - when > self.window_s:
            return None
        self._backs = [(t, n) for t, n in self._backs if now - t <= self.window_s] + [(now, name)]
        quiet = self._warned_at is not None and now - self._warned_at < self.window_s
        if len(self._backs) < self.warn_after or quiet:
            return None
        self._warned_at = now
        names = sorted({n for _, n in self._backs} | set(self._evicted))
        return (
            f"models keep swapping: {', '.join(names)} were reloaded {len(self._backs)} times in the last "
            f"{self.window_s:.0f} s because the budget does not hold them together. Give the manager room for "
            f"them (RKLLM_MAX_LOADED / RKLLM_MEMORY_BUDGET_MB, or ModelManager(max_loaded=...) with "
            f"set_default_manager)"
        )
