"""The model manager: friendly name -> live runtime handle, with automatic swapping.

Work on a model happens under a :class:`Lease` (``with manager.lease(name) as lease``
in threads, ``async with manager.alease(name) as lease`` in tasks). A leased model
is never unloaded; a model with no lease is *idle*. The manager is one line of
requests, served by these rules (the fairness policy):

* **Loaded models are granted at once** — unless the model has been chosen to make
  room for an earlier request that needs a swap (it is *draining*): then the new
  request waits behind that swap.
* **Loads and swaps go strictly in arrival order.** Only the earliest request whose
  model is not loaded may load or unload anything. When the budget
  (``max_loaded`` and/or ``memory_budget_mb``) is full it picks the models to
  unload (idle ones first, then least recently used), waits until their
  running requests finish — a swap never aborts anyone's generation — unloads
  them, then loads its model. Requests that arrive later for a draining model
  wait behind it, so a swap waits only for the requests that were already
  running, never for an unbounded number of later ones.
* **Waiting never occupies a thread.** A task awaits a future; a thread waits on
  an event; cancelling or timing out (``timeout=`` → :class:`~rkllm_core.errors.BusyError`)
  leaves the line at once, and the line moves on. ``rkllm_init`` and
  ``rkllm_destroy`` run on the requesting thread, or for a task on the core's
  own executor, never on the event loop.
* **Owners are threads or tasks, and what a call chain holds travels with it**
  (tasks started from inside a request inherit its leases through a context
  variable). A request that could only be served by unloading a model its own
  chain holds (a nested request, e.g. from a callback inside a stream, even
  through ``asyncio.gather``) gets ``BusyError`` at once instead of waiting for
  itself; so does a swap whose every blocker is itself waiting in the line; a
  chain that holds a model never waits behind a swap for it.
* **Closed handles are dropped.** A runtime closed by its user is forgotten and
  reloaded on the next request.

Two requests for one model share one load; a load that fails fails every request
waiting for it. Memory is estimated from the file size until a run reports the
runtime's peak memory while that model was the only one loaded. On the 1.2 ABI
sampling and ``max_new_tokens`` are fixed at ``rkllm_init``: instances are keyed by
(model, init settings), so a request with other settings loads another instance.
On 1.3 they are per run and one instance serves every setting. Handles are closed
at interpreter exit in reverse load order.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .. import preflight
from .._sync import NESTED_GRACE_TURNS, Deadline, Waiter, describe_owner, held_items, hold, offload, unhold
from ..board import detect_board_platform, platform_matches
from ..errors import BusyError, ContextLengthError, InvalidParameterError, RKLLMError
from ..native.library import RuntimeLibrary, load_library
from ..params import InitParams, PerfStats, SamplingParams
from ..runtime.handle import RKLLMRuntime
from .registry import ModelInfo, ModelRegistry, require_kind

logger = logging.getLogger(__name__)

__all__ = ["Lease", "LoadedModel", "ModelManager", "default_manager", "manager_for", "set_default_manager"]

LONGROPE_MIN_CONTEXT = 16384
"""Models with a context above this use LongRoPE, which needs runtime >= 1.2.2."""

_Key = tuple[str, InitParams]


@dataclass(eq=False)
class LoadedModel:
    """Book-keeping for one loaded instance (read-only for callers)."""

    info: ModelInfo
    init: InitParams
    runtime: RKLLMRuntime | None = None
    loading: bool = True
    leases: int = 0
    holders: Counter[Hashable] = field(default_factory=Counter)  # owner (thread or task) -> leases
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

    @property
    def key(self) -> _Key:
        """(friendly name, init settings): what identifies the instance."""
        return self.info.name, self.init


class Lease:
    """Permission to use a loaded model; the model stays loaded until released.

    A context manager (``with``/``async with``) that releases itself. It belongs to
    the thread or task that asked for it, but may be released from anywhere.
    """

    def __init__(self, manager: ModelManager, entry: LoadedModel, owner: Hashable) -> None:
        self._manager = manager
        self._entry = entry
        self._released = False
        self.owner = owner
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

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return self._released

    @property
    def holding(self) -> bool:
        """True until released."""
        return not self._released

    def record_stats(self, stats: PerfStats | None) -> None:
        """Report a run's perf stats (used to measure the model's memory)."""
        self._manager._record(self._entry, stats)

    def release(self) -> None:
        """Give the model back (idempotent, any thread; never blocks on native code)."""
        if not self._released:
            self._released = True
            unhold(self)
            self._manager._release(self._entry, self.owner)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


_Action = tuple[Literal["load"], LoadedModel] | tuple[Literal["unload"], list[LoadedModel]]


class _Request:
    """One request in the manager's line."""

    __slots__ = (
        "action",
        "chain",
        "error",
        "info",
        "key",
        "lease",
        "loaded",
        "owner",
        "params",
        "seq",
        "state",
        "victims",
        "waiter",
    )

    def __init__(self, info: ModelInfo, params: InitParams, loop: asyncio.AbstractEventLoop | None) -> None:
        self.info = info
        self.params = params
        self.key: _Key = (info.name, params)
        self.waiter = Waiter(loop=loop)
        self.owner = self.waiter.owner
        self.state: Literal["waiting", "acting", "done", "left"] = "waiting"
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.action: _Action | None = None
        self.victims: list[LoadedModel] | None = None
        self.loaded = False  # this request loaded its model (its lease is not a cache hit)
        # Models the caller's own chain holds (this task or thread, and the tasks it is waiting for).
        self.chain = {x._entry for x in held_items() if isinstance(x, Lease)}
        self.seq = 0  # arrival order


class _AsyncLease:
    """What :meth:`ModelManager.alease` returns: await it, or use it with ``async with``."""

    def __init__(
        self,
        manager: ModelManager,
        name: str,
        init: InitParams | None,
        timeout: float | None,
        kinds: tuple[Sequence[str], str] | None,
    ) -> None:
        self._args = (manager, name, init, timeout, kinds)
        self._lease: Lease | None = None

    def __await__(self) -> Generator[Any, None, Lease]:
        manager, name, init, timeout, kinds = self._args
        return manager._alease(name, init, timeout, kinds).__await__()

    async def __aenter__(self) -> Lease:
        self._lease = await self
        return self._lease

    async def __aexit__(self, *exc: object) -> None:
        if self._lease is not None:
            self._lease.release()


class ModelManager:
    """Loads models by name on demand and keeps them within a budget.

    Args:
        registry: where names are resolved (default: a registry over the default directories).
        max_loaded: most instances loaded at once (default 1; ``None`` for no limit).
        memory_budget_mb: most estimated memory in MB (``None`` for no limit).
        library: the runtime library or its path (default: lookup on first load).
        abi: force the runtime ABI.
        preflight: check memory and the NPU driver before each load (:mod:`rkllm_core.preflight`),
            unloading idle models first when that frees the memory a load needs; default: for a
            real runtime, not the simulator.
    """

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        *,
        max_loaded: int | None = 1,
        memory_budget_mb: float | None = None,
        library: RuntimeLibrary | str | os.PathLike[str] | None = None,
        abi: str | None = None,
        preflight: bool | None = None,
    ) -> None:
        bad_count = isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1
        if max_loaded is not None and bad_count:
            raise InvalidParameterError("max_loaded must be at least 1 (or None for no limit)")
        if memory_budget_mb is not None and memory_budget_mb <= 0:
            raise InvalidParameterError("memory_budget_mb must be positive (or None for no limit)")
        self.registry = registry if registry is not None else ModelRegistry()
        self.max_loaded = max_loaded
        self.memory_budget_mb = memory_budget_mb
        self._library_arg = library
        self._abi_arg = abi
        self._preflight = preflight
        self._library: RuntimeLibrary | None = library if isinstance(library, RuntimeLibrary) else None
        self._library_lock = threading.Lock()
        self._mutex = threading.Lock()
        self._entries: dict[_Key, LoadedModel] = {}
        self._line: list[_Request] = []
        self._acting: _Request | None = None  # the request currently loading or unloading
        self._unloading: dict[LoadedModel, int] = {}  # unload() waits for their leases: none for later arrivals
        self._arrivals = 0
        self._watchers: list[Waiter] = []  # unload() callers waiting for leases to end
        self._load_counter = 0
        self._closed = False
        self.stats = {"loads": 0, "unloads": 0, "load_failures": 0, "hits": 0}
        self._board_platform: str | None | bool = False  # False: not read yet
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- library ---------------------------------------------------------------------------------
    @property
    def library(self) -> RuntimeLibrary:
        """The runtime library (loaded on first use)."""
        if self._library is None:
            with self._library_lock:
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

    def lease(
        self,
        name: str,
        init: InitParams | None = None,
        *,
        timeout: float | None = None,
        kinds: tuple[Sequence[str], str] | None = None,
    ) -> Lease:
        """Return a lease on ``name``, loading it (and unloading idle models) when needed.

        Blocks the calling thread while waiting (see :meth:`alease` for tasks). On
        the 1.3 ABI pass only init-time settings in ``init`` (sampling is per run);
        on 1.2 the sampling in ``init`` selects the instance. ``kinds``, as
        ``(accepted kinds, who asks)``, refuses a model of another kind before
        anything is loaded (see :func:`~rkllm_core.models.registry.require_kind`).

        Raises:
            ModelNotFoundError: unknown name.
            ModelKindError: the model's kind is not among ``kinds``.
            ContextLengthError: ``max_context_len`` above the model's limit.
            BusyError: no room within ``timeout``, or waiting would never end.
            InitError: the runtime refused the model.
        """
        req = self._enter(name, init, None, kinds)
        deadline = Deadline(timeout)
        handed = False
        try:
            while True:
                lease, action = self._step(req)
                if lease is not None:
                    handed = True
                    hold(lease)
                    return lease
                if action is not None:
                    self._act(req, action)
                elif not req.waiter.wait(deadline.remaining()):
                    self._timed_out(req, timeout)
        finally:
            self._leave(req, handed)

    def alease(
        self,
        name: str,
        init: InitParams | None = None,
        *,
        timeout: float | None = None,
        kinds: tuple[Sequence[str], str] | None = None,
    ) -> _AsyncLease:
        """Async :meth:`lease`: ``lease = await manager.alease(name)`` or ``async with manager.alease(name) as lease``.

        Waiting occupies no thread; cancelling the task leaves the line at once
        (a load already started finishes on the core's executor and the model
        stays loaded, idle). ``rkllm_init``/``rkllm_destroy`` never run on the loop.
        """
        return _AsyncLease(self, name, init, timeout, kinds)

    async def _alease(
        self, name: str, init: InitParams | None, timeout: float | None, kinds: tuple[Sequence[str], str] | None
    ) -> Lease:
        deadline = Deadline(timeout)
        if self._library is None:
            await offload(lambda: self.library)  # dlopen and fingerprinting are file I/O: keep them off the loop
        for turn in range(NESTED_GRACE_TURNS + 1):
            try:
                req = self._enter(name, init, asyncio.get_running_loop(), kinds)
                break
            except BusyError as exc:  # a dropped async stream of ours may be closing right now
                if exc.reason != "deadlock" or turn == NESTED_GRACE_TURNS:
                    raise
                await asyncio.sleep(0)
        handed = False
        try:
            while True:
                lease, action = self._step(req)
                if lease is not None:
                    handed = True
                    hold(lease)
                    return lease
                if action is not None:
                    await offload(self._act, req, action)
                elif not await req.waiter.wait_async(deadline.remaining()):
                    self._timed_out(req, timeout)
        finally:
            self._leave(req, handed)

    def loaded(self) -> list[LoadedModel]:
        """Snapshot of loaded (or loading) instances, oldest load first."""
        with self._mutex:
            return sorted(self._entries.values(), key=lambda e: e.load_order)

    def is_loaded(self, name: str) -> bool:
        """True if some instance of ``name`` is loaded."""
        info = self.resolve(name)
        with self._mutex:
            return any(k[0] == info.name and not e.loading for k, e in self._entries.items())

    def waiting(self) -> int:
        """How many requests are in line (waiting, loading or unloading)."""
        with self._mutex:
            return len(self._line)

    def unload(self, name: str, *, timeout: float | None = None) -> int:
        """Unload every instance of ``name`` once its leases end (no new ones are granted). Returns the count.

        An instance still loading is unloaded once loaded. Blocks the calling thread.
        """
        info = self.resolve(name)
        deadline = Deadline(timeout)
        waiter = Waiter()
        count = 0
        mine: set[LoadedModel] = set()
        with self._mutex:
            self._watchers.append(waiter)
        try:
            while True:
                with self._mutex:
                    waiter.reset()
                    entries = [e for k, e in self._entries.items() if k[0] == info.name]
                    idle = [e for e in entries if e.leases == 0 and not e.loading]
                    for e in idle:
                        del self._entries[e.key]
                    busy = {e for e in entries if e.leases or e.loading}
                    mine |= busy
                    for e in busy:
                        self._unloading.setdefault(e, self._arrivals)
                if not entries:
                    return count
                self._close_entries(idle)
                count += len(idle)
                if idle:
                    continue
                if not waiter.wait(deadline.remaining()):
                    raise BusyError(f"{info.name} is still in use after {timeout} s", waited=timeout)
        finally:
            with self._mutex:
                self._watchers.remove(waiter)
                for e in mine:
                    self._unloading.pop(e, None)
                self._pump()

    def close(self) -> None:
        """Close every loaded handle, newest first (waits, bounded, for running generations)."""
        with self._mutex:
            self._closed = True
            entries = sorted(self._entries.values(), key=lambda e: e.load_order, reverse=True)
            self._entries.clear()
            self._unloading.clear()
            for req in self._line:
                if req.state == "waiting":
                    req.error = RKLLMError("the model manager was closed")
                    req.waiter.wake()
        for e in entries:
            if e.runtime is not None:
                e.runtime.close()

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the line ----------------------------------------------------------------------------------
    def _enter(
        self,
        name: str,
        init: InitParams | None,
        loop: asyncio.AbstractEventLoop | None,
        kinds: tuple[Sequence[str], str] | None = None,
    ) -> _Request:
        """Validate a request and put it in line (the checks that need no waiting happen here)."""
        info = self.resolve(name)
        if kinds is not None:
            require_kind(info, *kinds)
        if init is not None and self.library.backend.per_run_sampling:
            # Sampling and max_new_tokens are per run on 1.3: one instance (initialised with the
            # registry's defaults) serves every request.
            init = replace(init, sampling=SamplingParams(), max_new_tokens=None)
        params = self.init_params_for(info, init)
        self._check_runtime_supports(info)
        req = _Request(info, params, loop)
        with self._mutex:
            if self._closed:
                raise RKLLMError("the model manager is closed")
            self._check_self_deadlock(req)
            self._arrivals += 1
            req.seq = self._arrivals
            self._line.append(req)
            self._pump()
        return req

    def _step(self, req: _Request) -> tuple[Lease | None, _Action | None]:
        """What to do next: take the lease, do the assigned load/unload, or wait (both None)."""
        with self._mutex:
            req.waiter.reset()
            if req.error is not None:
                error, req.error = req.error, None
                raise error
            if req.lease is not None:
                return req.lease, None
            if req.action is not None:
                action, req.action = req.action, None
                return None, action
            return None, None

    def _timed_out(self, req: _Request, timeout: float | None) -> None:
        with self._mutex:
            if req.lease is not None or req.action is not None or req.error is not None:
                return  # granted in the meantime: the next step takes it
            what = "every loaded model is in use" if self._entries else "other requests are ahead in line"
            raise BusyError(
                f"no room for {req.info.name} within {timeout} s: {what} ({self._describe_loaded()})",
                waited=timeout,
            )

    def _leave(self, req: _Request, handed: bool) -> None:
        """The request is over (served, failed, timed out or cancelled): leave the line.

        A lease granted just as the caller gave up is released again; a load or
        unload in progress finishes on its own thread and publishes its result.
        """
        with self._mutex:
            if req in self._line:
                self._line.remove(req)
            if req.state != "done":
                req.state = "left"
            orphan = req.lease if not handed else None
            if req.action is not None:  # assigned a load/unload it will never do: undo the assignment
                kind, payload = req.action
                if kind == "load":
                    assert isinstance(payload, LoadedModel)
                    self._entries.pop(payload.key, None)
                else:
                    assert isinstance(payload, list)
                    for victim in payload:
                        self._entries[victim.key] = victim
                req.action = None
                if self._acting is req:
                    self._acting = None
            self._pump()
        if orphan is not None:
            orphan.release()

    def _act(self, req: _Request, action: _Action) -> None:
        """Do a load or an unload the line assigned to ``req`` (outside the lock), then publish."""
        kind, payload = action
        if kind == "unload":
            assert isinstance(payload, list)
            try:
                self._close_entries(payload)
            finally:
                with self._mutex:
                    self._acting = None
                    if req.state == "acting":
                        req.state = "waiting"
                    self._pump()
            return
        assert isinstance(payload, LoadedModel)
        entry = payload
        t0 = time.perf_counter()
        try:
            runtime = RKLLMRuntime(entry.info.path, params=entry.init, library=self.library, preflight=self._preflight)
        except BaseException as exc:
            with self._mutex:
                self._entries.pop(entry.key, None)
                self.stats["load_failures"] += 1
                self._acting = None
                for other in self._line:  # everyone waiting for this instance gets the same answer
                    if other.key == entry.key and other.state in ("waiting", "acting") and other.error is None:
                        other.error = exc
                        other.state = "waiting"
                        other.waiter.wake()
                self._pump()
            return
        with self._mutex:
            entry.runtime = runtime
            entry.loading = False
            entry.load_time_s = time.perf_counter() - t0
            entry.last_used = time.monotonic()
            self.stats["loads"] += 1
            self._acting = None
            req.loaded = True
            if req.state == "acting":
                req.state = "waiting"
            if self._closed:
                self._entries.pop(entry.key, None)
            logger.info("loaded %s in %.2f s", entry.info.name, entry.load_time_s)
            self._pump()
        if self._closed:
            runtime.close()

    def _close_entries(self, entries: list[LoadedModel]) -> None:
        for entry in entries:
            if entry.runtime is not None:
                try:
                    entry.runtime.close()
                except Exception:  # pragma: no cover - close never raises for an idle handle
                    logger.exception("closing %s failed", entry.info.name)
            with self._mutex:
                self.stats["unloads"] += 1
            logger.info("unloaded %s", entry.info.name)

    def _pump(self) -> None:
        """Serve the line (called with the lock held after every change). Never calls native code.

        1. Forget handles their users closed. 2. In arrival order, requests for loaded
        models get leases; the earliest request whose model is not loaded (the head)
        plans its load or swap when its turn comes, marking the models it must unload
        as draining, after which later requests for those models wait. 3. A swap whose
        every blocker is itself stuck in the line is refused.
        """
        for key, loaded in list(self._entries.items()):
            if loaded.runtime is not None and loaded.runtime.closed:  # closed by its user: forget it
                del self._entries[key]
                logger.info("%s was closed by its user; it will be reloaded when asked for", loaded.info.name)
        for gone in [e for e in self._unloading if self._entries.get(e.key) is not e]:
            del self._unloading[gone]
        draining: set[LoadedModel] = set()  # chosen by the head to make room
        woken: list[Waiter] = []
        waiting = [r for r in self._line if r.state == "waiting" and r.lease is None and r.error is None]
        head = None
        if self._acting is None:
            head = next((r for r in waiting if r.key not in self._entries), None)
        draining_for_head = False
        before_head = True
        for req in waiting:
            if req is head:
                before_head = False
                if self._plan_room(head):
                    woken.append(head.waiter)
                else:
                    draining_for_head = True
                    draining.update(head.victims or ())
                continue
            entry = self._entries.get(req.key)
            if entry is None or entry.loading:
                continue
            if entry not in req.chain:  # a chain that holds the model already never waits for it
                if req.seq > self._unloading.get(entry, req.seq) or (entry in draining and not before_head):
                    continue  # waits behind the unload, or the swap that chose this model
            self._grant(req, entry)
            woken.append(req.waiter)
        if head is not None and draining_for_head and head.victims:
            blockers = {owner for v in head.victims for owner in v.holders}
            stuck = {r.owner for r in self._line if r is not head and r.state == "waiting" and r.lease is None}
            if blockers and blockers <= stuck:
                head.victims = None
                head.error = BusyError(
                    f"{head.info.name} needs the room of models whose every user is itself waiting in line for a "
                    "model: waiting would never end (raise max_loaded/memory_budget_mb, or release leases "
                    "before asking for another model)",
                    reason="deadlock",
                )
                woken.append(head.waiter)
        for w in woken:
            w.wake()
        for w in self._watchers:
            w.wake()

    def _plan_room(self, req: _Request) -> bool:
        """Decide for the head of the load line; True if it was given something to do now."""
        victims = req.victims
        if victims is None or any(self._entries.get(v.key) is not v for v in victims):
            victims = self._choose_victims(req)
            req.victims = victims
        if victims is None:
            req.error = BusyError(self._deadlock_message(req), reason="deadlock")
            return True
        if not victims:
            self._load_counter += 1
            entry = LoadedModel(
                info=req.info, init=req.params, load_order=self._load_counter, estimated_mb=self._estimate_mb(req.info)
            )
            self._entries[req.key] = entry
            self._start_acting(req, ("load", entry))
            return True
        if all(v.leases == 0 for v in victims):
            for v in victims:
                del self._entries[v.key]
            req.victims = None
            self._start_acting(req, ("unload", victims))
            return True
        return False

    def _start_acting(self, req: _Request, action: _Action) -> None:
        self._acting = req
        req.state = "acting"
        req.action = action

    def _fits(self, count: int, used_mb: float, need_mb: float) -> bool:
        count_ok = self.max_loaded is None or count + 1 <= self.max_loaded
        mem_ok = self.memory_budget_mb is None or count == 0 or used_mb + need_mb <= self.memory_budget_mb
        return count_ok and mem_ok

    def _choose_victims(self, req: _Request) -> list[LoadedModel] | None:
        """[] if the model fits now; the models to unload for it; None if only its own owner's could make room.

        Beyond the budget, when pre-flight checks are on, idle models are also unloaded while the
        system lacks the memory the load needs (if unloading them can cover it).
        """
        entries = list(self._entries.values())
        need = self._estimate_mb(req.info)
        count, used = len(entries), sum(e.memory_mb for e in entries)
        short = self._memory_shortfall_mb(req.info)
        if self._fits(count, used, need) and short <= 0:
            return []
        waiting = {r.owner for r in self._line if r.state == "waiting"}
        candidates = [e for e in entries if not e.loading and e not in req.chain]
        # Idle first, then those whose users are not stuck in this line, then least recently used.
        candidates.sort(key=lambda e: (e.leases > 0, bool(set(e.holders) & waiting), e.last_used))
        victims: list[LoadedModel] = []
        for e in candidates:
            if self._fits(count, used, need):
                break
            victims.append(e)
            count, used = count - 1, used - e.memory_mb
        if not self._fits(count, used, need):
            return None
        idle = [e for e in candidates if e.leases == 0 and e not in victims]
        if short > 0 and short <= sum(e.memory_mb for e in victims + idle):
            for e in idle:  # free the system's memory too (else the pre-flight check refuses the load)
                if short <= sum(v.memory_mb for v in victims):
                    break
                victims.append(e)
        return victims

    def _memory_shortfall_mb(self, info: ModelInfo) -> float:
        """MB the system lacks to load ``info`` (0 when enough, unknown, or pre-flight checks are off)."""
        on = self._preflight if self._preflight is not None else not self.library.is_simulator
        if not on:
            return 0.0
        available = preflight.memory_available_mb(preflight.SYSTEM_ROOT)
        return 0.0 if available is None else preflight.memory_needed_mb(info.file_size) - available

    def _check_self_deadlock(self, req: _Request) -> None:
        """A request that only its own leases could make room for is refused at once."""
        mine = [e for e in self._entries.values() if e in req.chain]
        if not mine or req.key in self._entries:
            return
        if not self._fits(len(mine), sum(e.memory_mb for e in mine), self._estimate_mb(req.info)):
            raise BusyError(self._deadlock_message(req), reason="deadlock")

    def _deadlock_message(self, req: _Request) -> str:
        mine = ", ".join(e.info.name for e in self._entries.values() if e in req.chain) or "nothing"
        return (
            f"{describe_owner(req.owner)} holds {mine} and asks for {req.info.name}, which needs that room: "
            "it would wait for itself. Finish (or close the stream of) the first request before asking for "
            "another model, or raise max_loaded/memory_budget_mb"
        )

    def _grant(self, req: _Request, entry: LoadedModel) -> None:
        entry.leases += 1
        entry.holders[req.owner] += 1
        entry.last_used = time.monotonic()
        if not req.loaded:
            self.stats["hits"] += 1
        req.lease = Lease(self, entry, req.owner)
        req.state = "done"

    def _release(self, entry: LoadedModel, owner: Hashable) -> None:
        with self._mutex:
            entry.leases -= 1
            entry.holders[owner] -= 1
            if entry.holders[owner] <= 0:
                del entry.holders[owner]
            entry.last_used = time.monotonic()
            self._pump()

    def _record(self, entry: LoadedModel, stats: PerfStats | None) -> None:
        with self._mutex:
            entry.runs += 1
            if stats is not None and stats.memory_usage_mb > 0 and len(self._entries) == 1:
                entry.measured_mb = float(stats.memory_usage_mb)

    def _estimate_mb(self, info: ModelInfo) -> float:
        for (name, _), e in self._entries.items():
            if name == info.name and e.measured_mb is not None:
                return e.measured_mb
        return info.file_size / (1024 * 1024)

    def _describe_loaded(self) -> str:
        return ", ".join(f"{e.info.name} ({e.leases} in use)" for e in self._entries.values()) or "none loaded"

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
                stacklevel=4,
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
_managers: dict[tuple[str | None, str | None], ModelManager] = {}


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


def manager_for(
    model_dir: str | os.PathLike[str] | None = None, library_path: str | os.PathLike[str] | None = None
) -> ModelManager:
    """The manager for a model directory and/or runtime library: one per distinct pair, shared.

    With neither, the process-wide :func:`default_manager`. Adapters configured
    with ``model_dir=``/``library_path=`` get theirs here, so every object
    configured alike shares one budget and one set of loaded models.
    """
    if model_dir is None and library_path is None:
        return default_manager()
    key = (
        os.fspath(model_dir) if model_dir is not None else None,
        os.fspath(library_path) if library_path is not None else None,
    )
    with _default_lock:
        manager = _managers.get(key)
        if manager is None:
            registry = ModelRegistry([Path(model_dir)]) if model_dir is not None else None
            manager = _managers[key] = ModelManager(registry, library=library_path)
        return manager
