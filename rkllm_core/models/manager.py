"""The model manager: friendly name -> live runtime handle, with automatic swapping.

Design:

* Work on a model happens under a :class:`Lease` (``with manager.lease("qwen3-0.6b") as rt``).
  A leased model is never unloaded; a model with no lease is *idle*.
* When a request needs a model that is not loaded and the budget
  (``max_loaded`` models and/or ``memory_budget_mb``) is full, the least
  recently used idle model is closed first. If every loaded model is leased,
  the request waits (FIFO by arrival, optional timeout -> ``BusyError``)
  until one becomes idle. A running handle is therefore never destroyed,
  and a swap never aborts someone else's generation.
* Loading happens outside the manager lock; a second request for a model that
  is loading waits for that load instead of loading it twice. Requests for
  different models never deadlock: the only lock held while waiting is the
  manager's condition, and a thread that would wait for a model it leases
  itself gets ``BusyError`` at once instead of hanging.
* Memory is estimated from the file size until a run reports the runtime's
  peak memory while that model was the only one loaded.
* On the 1.2 ABI sampling and ``max_new_tokens`` are fixed at ``rkllm_init``:
  instances are keyed by (model, init settings), so a request with other
  settings loads another instance (evicting by LRU within the budget, i.e.
  re-initialising when the budget is one model). On 1.3 they are per run and
  one instance serves every setting.
* Handles are closed at interpreter exit in reverse load order.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from ..board import detect_board_platform, platform_matches
from ..errors import BusyError, ContextLengthError, InvalidParameterError, RKLLMError
from ..native.library import RuntimeLibrary, load_library
from ..params import InitParams, PerfStats, SamplingParams
from ..runtime.handle import RKLLMRuntime
from .registry import ModelInfo, ModelRegistry

logger = logging.getLogger(__name__)

__all__ = ["Lease", "LoadedModel", "ModelManager", "default_manager", "set_default_manager"]

LONGROPE_MIN_CONTEXT = 16384
"""Models with a context above this use LongRoPE, which needs runtime >= 1.2.2."""


@dataclass
class LoadedModel:
    """Book-keeping for one loaded instance (read-only for callers)."""

    info: ModelInfo
    init: InitParams
    runtime: RKLLMRuntime | None = None
    loading: bool = True
    leases: int = 0
    holders: dict[int, int] = field(default_factory=dict)  # thread id -> lease count
    last_used: float = 0.0
    load_order: int = 0
    load_time_s: float = 0.0
    estimated_mb: float = 0.0
    measured_mb: float | None = None
    runs: int = 0

    @property
    def memory_mb(self) -> float:
        """Measured memory when known, else the estimate."""
        return self.measured_mb if self.measured_mb is not None else self.estimated_mb


class Lease:
    """Permission to use a loaded model; the model stays loaded until released."""

    def __init__(self, manager: ModelManager, entry: LoadedModel) -> None:
        self._manager = manager
        self._entry = entry
        self._released = False
        assert entry.runtime is not None
        self.runtime: RKLLMRuntime = entry.runtime

    @property
    def info(self) -> ModelInfo:
        """The registry entry of the leased model."""
        return self._entry.info

    @property
    def init(self) -> InitParams:
        """The init settings the instance was loaded with."""
        return self._entry.init

    def record_stats(self, stats: PerfStats | None) -> None:
        """Report a run's perf stats (used to measure the model's memory)."""
        self._manager._record(self._entry, stats)

    def release(self) -> None:
        """Give the model back (idempotent)."""
        if not self._released:
            self._released = True
            self._manager._release(self._entry)

    def __enter__(self) -> RKLLMRuntime:
        return self.runtime

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelManager:
    """Loads models by name on demand and keeps them within a budget.

    Args:
        registry: where names are resolved (default: a registry over the default directories).
        max_loaded: most instances loaded at once (default 1; ``None`` for no limit).
        memory_budget_mb: most estimated memory in MB (``None`` for no limit).
        library: the runtime library or its path (default: lookup on first load).
        abi: force the runtime ABI.
    """

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        *,
        max_loaded: int | None = 1,
        memory_budget_mb: float | None = None,
        library: RuntimeLibrary | str | os.PathLike[str] | None = None,
        abi: str | None = None,
    ) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise InvalidParameterError("max_loaded must be at least 1 (or None for no limit)")
        if memory_budget_mb is not None and memory_budget_mb <= 0:
            raise InvalidParameterError("memory_budget_mb must be positive (or None for no limit)")
        self.registry = registry if registry is not None else ModelRegistry()
        self.max_loaded = max_loaded
        self.memory_budget_mb = memory_budget_mb
        self._library_arg = library
        self._abi_arg = abi
        self._library: RuntimeLibrary | None = library if isinstance(library, RuntimeLibrary) else None
        self._cond = threading.Condition(threading.Lock())
        self._entries: dict[tuple[str, InitParams], LoadedModel] = {}
        self._load_counter = 0
        self._ticket = 0
        self._serving = 0
        self._skipped: set[int] = set()
        self._closed = False
        self.stats = {"loads": 0, "unloads": 0, "load_failures": 0, "hits": 0}
        self._board_platform: str | None | bool = False  # False: not read yet
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- library ---------------------------------------------------------------------------------
    @property
    def library(self) -> RuntimeLibrary:
        """The runtime library (loaded on first use)."""
        if self._library is None:
            lib_arg = self._library_arg if not isinstance(self._library_arg, RuntimeLibrary) else None
            self._library = load_library(lib_arg, self._abi_arg)
        return self._library

    # -- public ----------------------------------------------------------------------------------
    def resolve(self, name: str) -> ModelInfo:
        """Resolve a name to its registry entry (raises ``ModelNotFoundError``)."""
        return self.registry.get(name)

    def init_params_for(self, info: ModelInfo, init: InitParams | None = None) -> InitParams:
        """Complete ``init`` with the model's context size and registry defaults, checking limits."""
        init = init or InitParams()
        limit = info.context_size
        requested = init.max_context_len
        if requested is None:
            requested = info.defaults.max_context_len or limit
        if requested > limit:
            raise ContextLengthError(
                f"max_context_len={requested} is above the limit of {info.name} ({limit} tokens, "
                f"{'from its file name' if info.context_from_name else 'default/registry'}); "
                f"use at most {limit}",
                requested=requested,
                limit=limit,
            )
        d = info.defaults
        sampling = d.sampling.merged(init.sampling)
        max_new = init.max_new_tokens if init.max_new_tokens is not None else d.max_new_tokens
        return replace(init, max_context_len=requested, sampling=sampling, max_new_tokens=max_new)

    def lease(self, name: str, init: InitParams | None = None, *, timeout: float | None = None) -> Lease:
        """Return a lease on ``name``, loading it (and unloading idle models) when needed.

        On the 1.3 ABI pass only init-time settings in ``init`` (sampling is per
        run); on 1.2 the sampling in ``init`` selects the instance.

        Raises:
            ModelNotFoundError: unknown name.
            ContextLengthError: ``max_context_len`` above the model's limit.
            BusyError: no room within ``timeout`` (or waiting would deadlock this thread).
            InitError: the runtime refused the model.
        """
        info = self.resolve(name)
        if init is not None and self.library.abi == "1.3":
            # Sampling and max_new_tokens are per run on 1.3: one instance (initialised with the
            # registry's defaults) serves every request.
            init = replace(init, sampling=SamplingParams(), max_new_tokens=None)
        params = self.init_params_for(info, init)
        self._check_runtime_supports(info)
        key = (info.name, params)
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        with self._cond:
            ticket = self._ticket
            self._ticket += 1
            try:
                while True:
                    if self._closed:
                        raise RKLLMError("the model manager is closed")
                    entry = self._entries.get(key)
                    if entry is not None and not entry.loading:
                        self.stats["hits"] += 1
                        return self._grant(entry, me)
                    if entry is None and self._serving == ticket:
                        victim, fits = self._make_room(info)
                        if fits:
                            entry = self._start_load(key, info, params)
                            break
                        if victim is not None:
                            self._unload_locked(victim)
                            continue
                        self._check_self_deadlock(me)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise BusyError(
                            f"no room to load {info.name} within {timeout} s: every loaded model is in use "
                            f"({self._describe_loaded()})"
                        )
                    self._cond.wait(remaining)
            finally:
                # Leave the line: the next ticket (skipping any that left early) is served.
                self._skip_ticket(ticket)
        return self._finish_load(entry, me)

    @contextmanager
    def using(self, name: str, init: InitParams | None = None, *, timeout: float | None = None) -> Iterator[Lease]:
        """Context-manager form of :meth:`lease` yielding the lease itself."""
        lease = self.lease(name, init, timeout=timeout)
        try:
            yield lease
        finally:
            lease.release()

    def loaded(self) -> list[LoadedModel]:
        """Snapshot of loaded (or loading) instances, oldest load first."""
        with self._cond:
            return sorted(self._entries.values(), key=lambda e: e.load_order)

    def is_loaded(self, name: str) -> bool:
        """True if some instance of ``name`` is loaded."""
        info = self.resolve(name)
        with self._cond:
            return any(k[0] == info.name and not e.loading for k, e in self._entries.items())

    def unload(self, name: str, *, timeout: float | None = None) -> int:
        """Unload every idle-or-finishing instance of ``name``; waits for leases to end. Returns the count."""
        info = self.resolve(name)
        deadline = None if timeout is None else time.monotonic() + timeout
        count = 0
        with self._cond:
            while True:
                entries = [e for k, e in self._entries.items() if k[0] == info.name and not e.loading]
                if not entries:
                    return count
                idle = [e for e in entries if e.leases == 0]
                for e in idle:
                    self._unload_locked(e)
                    count += 1
                if idle:
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BusyError(f"{info.name} is still in use after {timeout} s")
                self._cond.wait(remaining)

    def close(self) -> None:
        """Close every loaded handle, newest first (waits for running generations)."""
        with self._cond:
            self._closed = True
            entries = sorted(self._entries.values(), key=lambda e: e.load_order, reverse=True)
        for e in entries:
            if e.runtime is not None:
                e.runtime.close()
        with self._cond:
            self._entries.clear()
            self._cond.notify_all()

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with self._cond held unless noted) -------------------------------------------
    def _skip_ticket(self, ticket: int) -> None:
        # Tickets ahead of `_serving` that leave are remembered so the line moves past them.
        self._skipped.add(ticket)
        while self._serving in self._skipped:
            self._skipped.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def _grant(self, entry: LoadedModel, me: int) -> Lease:
        entry.leases += 1
        entry.holders[me] = entry.holders.get(me, 0) + 1
        entry.last_used = time.monotonic()
        return Lease(self, entry)

    def _make_room(self, info: ModelInfo) -> tuple[LoadedModel | None, bool]:
        """Return (an idle LRU victim or None, whether the new model fits now)."""
        entries = list(self._entries.values())
        count_ok = self.max_loaded is None or len(entries) < self.max_loaded
        need = self._estimate_mb(info)
        used = sum(e.memory_mb for e in entries)
        mem_ok = self.memory_budget_mb is None or not entries or used + need <= self.memory_budget_mb
        if count_ok and mem_ok:
            return None, True
        idle = [e for e in entries if e.leases == 0 and not e.loading]
        victim = min(idle, key=lambda e: e.last_used) if idle else None
        return victim, False

    def _check_self_deadlock(self, me: int) -> None:
        busy = [e for e in self._entries.values() if e.leases > 0 or e.loading]
        if busy and all(e.holders.get(me, 0) == e.leases and e.leases > 0 for e in busy):
            names = ", ".join(e.info.name for e in busy)
            raise BusyError(
                f"this thread holds the only loaded model(s) ({names}) and asks for another that needs "
                "their room: release the lease first, or raise max_loaded/memory_budget_mb"
            )

    def _start_load(self, key: tuple[str, InitParams], info: ModelInfo, params: InitParams) -> LoadedModel:
        self._load_counter += 1
        entry = LoadedModel(info=info, init=params, load_order=self._load_counter, estimated_mb=self._estimate_mb(info))
        self._entries[key] = entry
        return entry

    def _finish_load(self, entry: LoadedModel, me: int) -> Lease:
        """Initialise outside the lock, then publish the result."""
        key = (entry.info.name, entry.init)
        t0 = time.perf_counter()
        try:
            runtime = RKLLMRuntime(entry.info.path, params=entry.init, library=self.library)
        except BaseException:
            with self._cond:
                self._entries.pop(key, None)
                self.stats["load_failures"] += 1
                self._cond.notify_all()
            raise
        with self._cond:
            entry.runtime = runtime
            entry.loading = False
            entry.load_time_s = time.perf_counter() - t0
            self.stats["loads"] += 1
            logger.info("loaded %s in %.2f s", entry.info.name, entry.load_time_s)
            lease = self._grant(entry, me)
            self._cond.notify_all()
            return lease

    def _unload_locked(self, entry: LoadedModel) -> None:
        """Close an idle entry. Called with the lock held; closing happens without it."""
        key = (entry.info.name, entry.init)
        self._entries.pop(key, None)
        runtime = entry.runtime
        self._cond.release()
        try:
            if runtime is not None:
                runtime.close()  # no lease -> no run in progress; close still waits if one were
        finally:
            self._cond.acquire()
        self.stats["unloads"] += 1
        logger.info("unloaded %s", entry.info.name)
        self._cond.notify_all()

    def _release(self, entry: LoadedModel) -> None:
        me = threading.get_ident()
        with self._cond:
            entry.leases -= 1
            held = entry.holders.get(me, 0)
            if held > 1:
                entry.holders[me] = held - 1
            elif held == 1:
                del entry.holders[me]
            else:  # released on another thread than acquired: drop one holder record
                for tid in list(entry.holders):
                    entry.holders[tid] -= 1
                    if entry.holders[tid] == 0:
                        del entry.holders[tid]
                    break
            entry.last_used = time.monotonic()
            self._cond.notify_all()

    def _record(self, entry: LoadedModel, stats: PerfStats | None) -> None:
        with self._cond:
            entry.runs += 1
            if stats is not None and stats.memory_usage_mb > 0 and len(self._entries) == 1:
                entry.measured_mb = float(stats.memory_usage_mb)

    def _estimate_mb(self, info: ModelInfo) -> float:
        for (name, _), e in self._entries.items():
            if name == info.name and e.measured_mb is not None:
                return e.measured_mb
        return info.file_size / (1024 * 1024)

    def _describe_loaded(self) -> str:
        return ", ".join(f"{e.info.name} ({e.leases} in use)" for e in self._entries.values()) or "none"

    def _check_runtime_supports(self, info: ModelInfo) -> None:
        lib = self.library
        if info.context_size > LONGROPE_MIN_CONTEXT and lib.version:
            parts = tuple(int(p) for p in lib.version.split(".")[:3] if p.isdigit())
            if parts < (1, 2, 2):
                raise InvalidParameterError(
                    f"{info.name} has a {info.context_size}-token context (LongRoPE), which needs runtime "
                    f">= 1.2.2; this runtime is {lib.version}"
                )
        if self._board_platform is False:
            self._board_platform = detect_board_platform()
        board = self._board_platform if isinstance(self._board_platform, str) else None
        model_platform = info.facts.platform
        if board and model_platform and not platform_matches(model_platform, board):
            warnings.warn(
                f"{info.name} was converted for {model_platform} but this board is {board}; it may fail to load",
                RuntimeWarning,
                stacklevel=3,
            )


def _close_at_exit(ref: weakref.ReferenceType[ModelManager]) -> None:
    manager = ref()
    if manager is not None:
        try:
            manager.close()
        except Exception:  # pragma: no cover - interpreter exit
            logger.exception("closing models at exit failed")


_default: ModelManager | None = None
_default_lock = threading.Lock()


def default_manager() -> ModelManager:
    """Return the process-wide manager (created on first use with default settings)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelManager()
        return _default


def set_default_manager(manager: ModelManager | None) -> ModelManager | None:
    """Replace the process-wide manager; return the previous one (not closed)."""
    global _default
    with _default_lock:
        previous, _default = _default, manager
        return previous
