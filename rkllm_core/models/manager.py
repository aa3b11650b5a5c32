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
* **Leases are used in the order they were granted.** A lease books its handle's
  next turn as it is granted (:meth:`RKLLMRuntime.reserve`), and the first session
  its holder's call chain opens takes that turn: the request that triggered a
  load runs first, then the others in arrival order, whichever thread or task
  wakes first.
* **The budget holds at every instant.** A model counts against it from the start
  of its load until its handle is destroyed — also while an unload, a close by its
  user (deferred until a run returns), a failed load or a cancelled request is
  still under way — so a load never starts beside memory that is still taken.
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

The rules themselves are :class:`~rkllm_core.models.line.LinePolicy`, pure state
tested without threads; this module does the loading, unloading and waking they
decide on. Two requests for one model share one load; a load that fails fails
every request waiting for it. A vision model with an image encoder (:attr:`ModelInfo.encoder
<rkllm_core.models.registry.ModelInfo.encoder>`) is one unit: its
:class:`~rkllm_core.vision.encoder.ImageEncoder` is loaded with it (before it: a missing or
corrupt encoder fails the load in milliseconds, before the language model's long init), counts
in its memory, and goes with it on eviction, :meth:`ModelManager.unload`, keep-alive expiry and
:meth:`ModelManager.close`: the encoder is closed once the language model's handle is destroyed.
A text-only request to such a model does not use the encoder, which stays resident all the same
(the unit is never split). :attr:`Lease.encoder` gives it to the chat layer.
Memory is estimated from the file size (plus the extra KV caches of
an ``n_batch`` instance, :func:`~rkllm_core.models.line.batch_kv_mb`, and the encoder file's
size) until a run reports the runtime's peak memory while that model was the only one loaded; a
loaded encoder reports its own (``ImageEncoder.memory_bytes``), which is added to the runtime's
figure (an overestimate if that figure already holds it: safe for the budget). On the 1.2 ABI
sampling and ``max_new_tokens`` are fixed at ``rkllm_init``: instances are keyed by
(model, init settings), so a request with other settings loads another instance.
On 1.3 they are per run and one instance serves every setting. Handles are closed
at interpreter exit in reverse load order.

The budget, unless given, keeps as many models as fit in the memory available
(``RKLLM_MAX_LOADED`` and ``RKLLM_MEMORY_BUDGET_MB`` override it; see
:mod:`rkllm_core.models.budget`); models that keep swapping each other out are
named in a warning, at most once a minute. :meth:`ModelManager.on_load` tells a
listener when a load starts and ends (the CLI and the server show it).
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
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import preflight
from .._sync import NESTED_GRACE_TURNS, Deadline, Reservation, Waiter, held_items, hold, offload, unhold
from ..board import detect_board_platform, platform_matches
from ..errors import BusyError, InvalidParameterError, RKLLMError
from ..native.library import RuntimeLibrary, load_library
from ..params import (
    SAMPLING_POLICIES,
    ImageTags,
    InitParams,
    PerfStats,
    SamplingParams,
    SamplingPolicy,
    context_len,
)
from ..runtime.handle import RKLLMRuntime
from .budget import AUTO, Budget, SwapWatch, resolve_budget
from .line import Action, LinePolicy, LoadedModel, Request
from .registry import ModelInfo, ModelRegistry, require_kind

if TYPE_CHECKING:
    from ..native.rknn import RKNNLibrary
    from ..vision.encoder import ImageEncoder
    from ..vision.families import VisionFamily

logger = logging.getLogger(__name__)

__all__ = [
    "Lease",
    "LoadEvent",
    "LoadedModel",
    "ModelManager",
    "default_manager",
    "manager_for",
    "set_default_manager",
]

LONGROPE_MIN_CONTEXT = 16384
"""Models with a context above this use LongRoPE, which needs runtime >= 1.2.2."""


@dataclass(frozen=True, slots=True)
class LoadEvent:
    """A load starting or ending, for :meth:`ModelManager.on_load` listeners.

    Attributes:
        name: the model's friendly name.
        size_mb: its file size in MB.
        phase: ``start``, ``done`` or ``failed``.
        seconds: how long the load took (``done`` and ``failed``).
        error: why it failed (``failed``).
    """

    name: str
    size_mb: float
    phase: Literal["start", "done", "failed"]
    seconds: float | None = None
    error: BaseException | None = None


class Lease:
    """Permission to use a loaded model; the model stays loaded until released.

    A context manager (``with``/``async with``) that releases itself. It belongs to
    the thread or task that asked for it, but may be released from anywhere. It
    books the handle's next turn for its holder, so requests the manager served in
    arrival order also run in that order; the booking goes with the first session
    the holder's call chain opens on :attr:`runtime`, and is given up on release.
    """

    def __init__(
        self, manager: ModelManager, entry: LoadedModel, owner: Hashable, booking: Reservation | None = None
    ) -> None:
        self._manager = manager
        self._entry = entry
        self._booking = booking
        self._released = False
        self.owner = owner
        assert entry.runtime is not None
        self.runtime: RKLLMRuntime = entry.runtime
        self.sampling_policy = "run"
        """How the request's sampling was served: ``run`` (1.3), or the 1.2 :data:`SamplingPolicy`."""

    @property
    def info(self) -> ModelInfo:
        """The registry entry of the leased model."""
        return self._entry.info

    @property
    def init(self) -> InitParams:
        """The init settings the instance was loaded with."""
        return self._entry.init

    @property
    def encoder(self) -> ImageEncoder | None:
        """The image encoder loaded with a vision model, else None (text models, vision models without one).

        It stays loaded while the lease is held; one image runs at a time on it
        (:meth:`~rkllm_core.vision.encoder.ImageEncoder.encode` waits for the others).
        """
        return self._entry.encoder

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

    def _held(self) -> Lease:
        """Record the lease (and its booking of the handle) in the caller's chain."""
        hold(self)
        if self._booking is not None:
            hold(self._booking)
        return self

    def give_up_turn(self) -> None:
        """Give up the handle's turn this lease booked (idempotent); the model stays leased.

        For a request served by the handle's batch scheduler, whose dispatcher takes the
        handle's turns itself: a booking nobody claims would hold the handle for nobody.
        """
        if self._booking is not None:
            unhold(self._booking)
            self._booking.cancel()
            self._booking = None

    def release(self) -> None:
        """Give the model back (idempotent, any thread; never blocks on native code)."""
        if not self._released:
            self._released = True
            unhold(self)
            if self._booking is not None:
                unhold(self._booking)
                self._booking.cancel()
            self._manager._release(self._entry, self.owner)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


_Step = tuple[Literal["act"], Action] | tuple[Literal["wait"], float | None]


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
        max_loaded: most instances loaded at once (``None`` for no limit). Default ``"auto"``:
            ``RKLLM_MAX_LOADED``, else no count limit when a memory budget applies, else 2.
        memory_budget_mb: most estimated memory in MB (``None`` for no limit). Default ``"auto"``:
            ``RKLLM_MEMORY_BUDGET_MB``, else what fits in the memory available now, unless
            ``max_loaded`` was given (see :mod:`rkllm_core.models.budget`).
        library: the runtime library or its path (default: lookup on first load).
        abi: force the runtime ABI.
        preflight: check memory and the NPU driver before each load (:mod:`rkllm_core.preflight`),
            unloading idle models first when that frees the memory a load needs; default: for a
            real runtime, not the simulator.
        sampling_policy: how a request's sampling is served on the 1.2 ABI, whose runtime fixes
            it at init (see :data:`~rkllm_core.params.SamplingPolicy`; a model's
            ``sampling_policy`` in its registry file overrides it). Default ``reload``: one
            instance per model, re-initialised when a request's sampling differs.
        keep_alive: seconds a model may stay loaded unused before it is unloaded (``None`` or
            negative: until the budget needs its room); :meth:`keep_alive` sets it per model.
        n_batch: experimental batched decoding for chat models that set no ``n_batch`` of their
            own (registry file): their instances are loaded with this many slots, and concurrent
            requests share runs (see :mod:`rkllm_core.runtime.scheduler`). ``None`` or 1: off.
            The memory estimate counts the extra slots' KV caches (:func:`~.line.batch_kv_mb`).
        rknn_library: the RKNN runtime (``librknnrt.so``) for vision models' image encoders, or its
            path (default: ``RKNN_LIB_PATH``, then the usual places; looked up at the first
            encoder load).
    """

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        *,
        max_loaded: int | None | Literal["auto"] = AUTO,
        memory_budget_mb: float | None | Literal["auto"] = AUTO,
        library: RuntimeLibrary | str | os.PathLike[str] | None = None,
        abi: str | None = None,
        preflight: bool | None = None,
        sampling_policy: SamplingPolicy = "reload",
        keep_alive: float | None = None,
        n_batch: int | None = None,
        rknn_library: RKNNLibrary | str | os.PathLike[str] | None = None,
    ) -> None:
        self._rknn_library = rknn_library
        if n_batch is not None:
            InitParams(n_batch=n_batch)  # the runtime's range, checked before anything loads
        self.n_batch = n_batch if n_batch is not None and n_batch > 1 else None
        """Slots of chat instances whose model sets no ``n_batch`` (``None``: batching off)."""
        if sampling_policy not in SAMPLING_POLICIES:
            raise InvalidParameterError(
                f"sampling_policy must be one of {', '.join(SAMPLING_POLICIES)}, got {sampling_policy!r}"
            )
        bad_count = isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1
        if max_loaded not in (None, AUTO) and bad_count:
            raise InvalidParameterError("max_loaded must be at least 1 (or None for no limit, or 'auto')")
        if memory_budget_mb not in (None, AUTO) and not (
            isinstance(memory_budget_mb, int | float) and memory_budget_mb > 0
        ):
            raise InvalidParameterError("memory_budget_mb must be positive (or None for no limit, or 'auto')")
        self.budget: Budget = resolve_budget(max_loaded, memory_budget_mb)
        """The budget in force and where it came from."""
        self.registry = registry if registry is not None else ModelRegistry()
        self._library_arg = library
        self._abi_arg = abi
        self._preflight = preflight
        self._library: RuntimeLibrary | None = library if isinstance(library, RuntimeLibrary) else None
        self._library_lock = threading.Lock()
        self._mutex = threading.Lock()
        self.sampling_policy: SamplingPolicy = sampling_policy
        self._policy = LinePolicy(self.budget.max_loaded, self.budget.memory_budget_mb, self._memory_shortfall_mb)
        self._swaps = SwapWatch()
        self._load_listeners: list[Callable[[LoadEvent], None]] = []
        self._keep_default = keep_alive
        self._keep: dict[str, float | None] = {}  # per model, set by keep_alive()
        self._reaper: threading.Thread | None = None  # unloads models idle past their keep-alive
        self._reaper_wake = threading.Condition(self._mutex)
        self._ignored_sampling: set[tuple[str, SamplingParams]] = set()  # "fixed": what was logged already
        self._granted: dict[Request, Lease] = {}  # leases granted, not yet taken by their requests
        self._watchers: list[Waiter] = []  # unload() callers waiting for leases to end
        self.stats = {"loads": 0, "unloads": 0, "load_failures": 0, "hits": 0}
        self._board_platform: str | None | bool = False  # False: not read yet
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def max_loaded(self) -> int | None:
        """Most instances in memory at once (``None``: no limit)."""
        return self._policy.max_loaded

    @property
    def memory_budget_mb(self) -> float | None:
        """Most estimated memory in MB (``None``: no limit)."""
        return self._policy.memory_budget_mb

    def on_load(self, listener: Callable[[LoadEvent], None]) -> Callable[[], None]:
        """Call ``listener`` when a load starts and when it ends; return a function that stops it.

        The listener runs on the thread doing the load, never under the manager's
        lock; what it raises is logged and ignored.
        """
        with self._mutex:
            self._load_listeners.append(listener)

        def remove() -> None:
            with self._mutex:
                if listener in self._load_listeners:
                    self._load_listeners.remove(listener)

        return remove

    def _tell(self, event: LoadEvent) -> None:
        with self._mutex:
            listeners = list(self._load_listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("a load listener failed on %s", event)

    # -- library ---------------------------------------------------------------------------------
    @property
    def library(self) -> RuntimeLibrary:
        """The runtime library (loaded on first use)."""
        if self._library is None:
            with self._library_lock:
                if self._library is None:
                    lib_arg = self._library_arg if not isinstance(self._library_arg, RuntimeLibrary) else None
                    self._library = load_library(lib_arg, self._abi_arg)
        if self._library.is_simulator and self.budget.from_memory:
            self._policy.min_models = 2  # the simulator's files are sparse: the host's memory says nothing
        return self._library

    # -- public ----------------------------------------------------------------------------------
    def resolve(self, name: str) -> ModelInfo:
        """Resolve a name to its registry entry (raises ``ModelNotFoundError``)."""
        return self.registry.get(name)

    def init_params_for(self, info: ModelInfo, init: InitParams | None = None) -> InitParams:
        """Complete ``init`` with the model's context size and registry defaults, checking limits."""
        init = init or InitParams()
        source = "from its file name" if info.context_from_name else "its default or registry value"
        asked = init.max_context_len if init.max_context_len is not None else info.defaults.max_context_len
        requested = context_len(asked, info.context_size, info.name, source)
        d = info.defaults
        sampling = d.sampling.merged(init.sampling)
        max_new = init.max_new_tokens if init.max_new_tokens is not None else d.max_new_tokens
        if max_new is None and not self.library.backend.per_run_sampling:
            max_new = requested  # 1.2 fixes it at init: the largest useful value; runs stop earlier themselves
        n_batch = init.n_batch if init.n_batch is not None else d.n_batch
        if n_batch is None and info.kind == "chat":
            n_batch = self.n_batch
        return replace(
            init,
            max_context_len=requested,
            sampling=sampling,
            max_new_tokens=max_new,
            n_batch=n_batch if n_batch is not None and n_batch > 1 else None,
            image_tags=init.image_tags or self._init_image_tags(info),
        )

    def _init_image_tags(self, info: ModelInfo) -> ImageTags | None:
        """Runtime 1.2 takes image tags at init: a vision model with an encoder gets its family's, always."""
        facts = _vision_facts(info) if _has_encoder(info) and self.library.abi == "1.2" else None
        return ImageTags(facts.img_start, facts.img_end, facts.img_content) if facts is not None else None

    def sampling_policy_for(self, name_or_info: str | ModelInfo) -> str:
        """How requests' sampling is served for a model: ``run`` on 1.3, else its :data:`SamplingPolicy`."""
        info = self.resolve(name_or_info) if isinstance(name_or_info, str) else name_or_info
        if self.library.backend.per_run_sampling:
            return "run"
        return info.defaults.sampling_policy or self.sampling_policy

    def _apply_sampling_policy(self, info: ModelInfo, params: InitParams) -> tuple[InitParams, InitParams | None]:
        """The settings to load with, and the slot they are keyed by when not all of them (1.2 only)."""
        policy = self.sampling_policy_for(info)
        if policy == "reload":
            return params, replace(params, sampling=SamplingParams())
        if policy == "fixed":
            own = info.defaults.sampling
            if params.sampling != own and (info.name, params.sampling) not in self._ignored_sampling:
                self._ignored_sampling.add((info.name, params.sampling))
                logger.warning(
                    "%s serves with its own sampling (sampling_policy 'fixed' on runtime 1.2); ignored: %s",
                    info.name,
                    {k: v for k, v in params.sampling.as_dict().items() if v is not None},
                )
            return replace(params, sampling=own), None
        return params, None

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
        deadline = Deadline(timeout)  # a bad timeout is refused before the request is in line
        req = self._enter(name, init, None, kinds)
        flow = self._lease_flow(req, deadline)
        try:
            step = next(flow)
            while True:
                if step[0] == "act":
                    self._act(req, step[1])
                    step = flow.send(True)
                else:
                    step = flow.send(req.waiter.wait(step[1]))
        except StopIteration as done:
            lease: Lease = done.value
            return lease
        finally:
            flow.close()

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
        flow = self._lease_flow(req, deadline)
        try:
            step = next(flow)
            while True:
                if step[0] == "act":
                    await offload(self._act, req, step[1])
                    step = flow.send(True)
                else:
                    step = flow.send(await req.waiter.wait_async(step[1]))
        except StopIteration as done:
            lease: Lease = done.value
            return lease
        finally:
            flow.close()

    def _lease_flow(self, req: Request, deadline: Deadline) -> Generator[_Step, bool, Lease]:
        """The steps of one request, written once: yields what to do, receives whether a wait was woken.

        The sync and async drivers (:meth:`lease`, :meth:`_alease`) only do the steps:
        an ``("act", action)`` load or unload, or a ``("wait", seconds)``. Closing the
        generator (a cancel, a timeout, an error) leaves the line.
        """
        handed = False
        try:
            while True:
                lease, action = self._step(req)
                if lease is not None:
                    handed = True
                    held: Lease = lease._held()
                    return held
                if action is not None:
                    yield ("act", action)
                elif not (yield ("wait", deadline.remaining())):
                    self._timed_out(req, deadline.timeout)
        finally:
            self._leave(req, handed)

    def loaded(self) -> list[LoadedModel]:
        """Snapshot of loaded (or loading) instances, oldest load first."""
        with self._mutex:
            return sorted(self._policy.entries.values(), key=lambda e: e.load_order)

    def is_loaded(self, name: str) -> bool:
        """True if some instance of ``name`` is loaded."""
        info = self.resolve(name)
        with self._mutex:
            return any(k[0] == info.name and not e.loading for k, e in self._policy.entries.items())

    def waiting(self) -> int:
        """How many requests are in line (waiting, loading or unloading)."""
        with self._mutex:
            return len(self._policy.line)

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
                    entries = [e for k, e in self._policy.entries.items() if k[0] == info.name]
                    idle = [e for e in entries if e.leases == 0 and not e.loading]
                    self._policy.retire(idle)
                    busy = {e for e in entries if e.leases or e.loading}
                    mine |= busy
                    self._policy.mark_unloading(busy)
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
                self._policy.unmark_unloading(mine)
                self._pump()

    # -- keep-alive: unloading models nobody used for a while ----------------------------------------
    @property
    def default_keep_alive(self) -> float | None:
        """Seconds a model may stay unused before it is unloaded, unless set per model (``None``: no limit)."""
        return self._keep_default

    def keep_alive(self, name: str, seconds: float | None) -> None:
        """Unload ``name`` once it has been unused for ``seconds`` (``None`` or negative: no expiry).

        It holds for the model from now on (Ollama's ``keep_alive``); ``0`` unloads it as
        soon as it is idle. A model in use is never unloaded by its keep-alive.
        """
        info = self.resolve(name)
        with self._mutex:
            self._keep[info.name] = None if seconds is None or seconds < 0 else float(seconds)
            if self._keep[info.name] is not None:
                self._start_reaper()
            self._reaper_wake.notify_all()

    def expires_at(self, name: str) -> float | None:
        """When ``name`` will be unloaded for being unused (``time.time()`` seconds), ``None`` for never."""
        model = self.resolve(name).name
        keep = self._keeps_for(model)
        if keep is None:
            return None
        with self._mutex:
            entries = [e for (n, _), e in self._policy.entries.items() if n == model]
            busy = any(e.leases or e.loading for e in entries)
            last = max((e.last_used for e in entries), default=time.monotonic())
        start = time.monotonic() if busy else last
        return time.time() + (start + keep - time.monotonic())

    def _keeps_for(self, name: str) -> float | None:
        keep = self._keep[name] if name in self._keep else self._keep_default
        return None if keep is None or keep < 0 else keep

    def _start_reaper(self) -> None:
        """Start the thread that unloads expired models (called with the lock held)."""
        if self._reaper is None and not self._policy.closed:
            self._reaper = threading.Thread(target=self._reap, name="rkllm-keep-alive", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Sleep until the next model's keep-alive ends, unload what expired; until the manager closes."""
        while True:
            with self._mutex:
                expired, wait = self._expired(time.monotonic())
                while not expired and not self._policy.closed:
                    self._reaper_wake.wait(wait)
                    expired, wait = self._expired(time.monotonic())
                if self._policy.closed:
                    return
                self._policy.retire(expired)
            for e in expired:
                logger.info(
                    "%s was unused for %.0f s (keep_alive): unloading", e.info.name, self._keeps_for(e.info.name)
                )
            try:
                self._close_entries(expired)
            finally:
                with self._mutex:
                    self._pump()

    def _expired(self, now: float) -> tuple[list[LoadedModel], float | None]:
        """The idle instances past their keep-alive, and how long until the next one is (lock held)."""
        expired: list[LoadedModel] = []
        wait: float | None = None
        for (name, _), e in self._policy.entries.items():
            keep = self._keeps_for(name)
            if keep is None or e.leases or e.loading or e in self._policy.unloading:
                continue
            left = e.last_used + keep - now
            if left <= 0:
                expired.append(e)
            else:
                wait = left if wait is None else min(wait, left)
        return expired, wait

    def close(self) -> None:
        """Close every loaded handle, newest first (waits, bounded, for running generations)."""
        with self._mutex:
            entries = self._policy.close()
            self._reaper_wake.notify_all()
            for req in self._policy.line:
                if req.pending:
                    req.error = RKLLMError("the model manager was closed")
                    req.waiter.wake()
        for e in entries:
            if e.runtime is not None:
                self._close_unit(e, e.runtime)

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the line (the policy decides, under the mutex; the I/O happens here, outside it) -------------
    def _enter(
        self,
        name: str,
        init: InitParams | None,
        loop: asyncio.AbstractEventLoop | None,
        kinds: tuple[Sequence[str], str] | None = None,
    ) -> Request:
        """Validate a request and put it in line (the checks that need no waiting happen here)."""
        info = self.resolve(name)
        if kinds is not None:
            require_kind(info, *kinds)
        params = self.init_params_for(info, self.library.backend.place_generation(init).instance)
        params, slot = self._apply_sampling_policy(info, params)
        self._check_runtime_supports(info)
        chain = {x._entry for x in held_items() if isinstance(x, Lease)}
        req = Request(info, params, Waiter(loop=loop), chain, slot)
        with self._mutex:
            if self._policy.closed:
                raise RKLLMError("the model manager is closed")
            self._policy.arrive(req)
            self._pump()
        return req

    def _step(self, req: Request) -> tuple[Lease | None, Action | None]:
        """What to do next: take the lease, do the assigned load/unload, or wait (both None)."""
        with self._mutex:
            req.waiter.reset()
            if req.error is not None:
                error, req.error = req.error, None
                raise error
            lease = self._granted.pop(req, None)
            if lease is not None:
                return lease, None
            return None, self._policy.take_action(req)

    def _timed_out(self, req: Request, timeout: float | None) -> None:
        with self._mutex:
            if req in self._granted or req.action is not None or req.error is not None:
                return  # granted in the meantime: the next step takes it
            what = "every loaded model is in use" if self._policy.entries else "other requests are ahead in line"
            raise BusyError(
                f"no room for {req.info.name} within {timeout} s: {what} ({self._policy.describe()})",
                waited=timeout,
            )

    def _leave(self, req: Request, handed: bool) -> None:
        """The request is over (served, failed, timed out or cancelled): leave the line.

        A lease granted just as the caller gave up is released again; a load or
        unload in progress finishes on its own thread and publishes its result.
        """
        with self._mutex:
            self._policy.leave(req)
            orphan = self._granted.pop(req, None) if not handed else None
            self._pump()
        if orphan is not None:
            orphan.release()

    def _act(self, req: Request, action: Action) -> None:
        """Do a load or an unload the line assigned to ``req`` (outside the lock), then publish."""
        kind, payload = action
        if kind == "unload":
            assert isinstance(payload, list)
            with self._mutex:
                for victim in payload:
                    self._swaps.evicted(victim.info.name, time.monotonic())
            try:
                self._close_entries(payload)
            finally:
                with self._mutex:
                    self._policy.unloaded(req)
                    self._pump()
            return
        assert isinstance(payload, LoadedModel)
        self._load(req, payload)

    def _load(self, req: Request, entry: LoadedModel) -> None:
        """Load ``entry`` and publish the outcome, whatever interrupts it (the line must never stall)."""
        info = entry.info
        encoding = f" with its image encoder {info.encoder.name}" if _has_encoder(info) and info.encoder else ""
        logger.info("loading %s (%.0f MB)%s…", info.name, info.size_mb, encoding)
        self._tell(LoadEvent(info.name, info.size_mb, "start"))
        t0 = time.perf_counter()
        try:
            runtime, encoder = self._open_unit(entry)
        except BaseException as exc:
            self._tell(LoadEvent(info.name, info.size_mb, "failed", time.perf_counter() - t0, exc))
            self._load_failed(entry, exc)
            if not isinstance(exc, Exception):  # Ctrl-C, SystemExit: the loading caller's to handle
                raise
            return
        try:
            self._publish(req, entry, runtime, t0, encoder)
        except BaseException as exc:  # interrupted before the instance was in service: close it again
            entry.encoder = encoder
            self._close_unit(entry, runtime)
            self._load_failed(entry, exc)
            raise
        self._tell(LoadEvent(info.name, info.size_mb, "done", entry.load_time_s))

    def _open_unit(self, entry: LoadedModel) -> tuple[RKLLMRuntime, ImageEncoder | None]:
        """Load the model and, for a vision model, its image encoder; on a failure nothing stays loaded.

        The encoder loads first: a missing or corrupt one fails in milliseconds, before the
        language model's init, which takes seconds.
        """
        info = entry.info
        encoder = self._open_encoder(info)
        try:
            runtime = RKLLMRuntime(info.path, params=entry.init, library=self.library, preflight=self._preflight)
        except BaseException:
            if encoder is not None:
                encoder.close()
            raise
        return runtime, encoder

    def _open_encoder(self, info: ModelInfo) -> ImageEncoder | None:
        """The image encoder of a vision model, loaded (None for a model without one)."""
        if not _has_encoder(info) or info.encoder is None:
            return None
        from ..vision.encoder import ImageEncoder  # librknnrt and the vision package only for vision models

        return ImageEncoder(info.encoder, family=_vision_facts(info), library=self._rknn_library)

    def _close_unit(self, entry: LoadedModel, runtime: RKLLMRuntime) -> None:
        """Close an instance's handle, then its encoder once the handle is destroyed (now, or after its run)."""
        if entry.encoder is not None and runtime.when_destroyed(lambda: _close_encoder(entry)):
            _close_encoder(entry)
        runtime.close()

    def _load_failed(self, entry: LoadedModel, exc: BaseException) -> None:
        """Everyone waiting for ``entry`` gets the failure (an interruption as an ``RKLLMError``)."""
        error = exc if isinstance(exc, Exception) else RKLLMError(f"loading {entry.info.name} was interrupted")
        with self._mutex:
            self.stats["load_failures"] += 1
            failed = self._policy.load_failed(entry, error) if self._policy.entries.get(entry.key) is entry else []
            self._pump()
        for waiter in failed:
            waiter.wake()

    def _publish(
        self, req: Request, entry: LoadedModel, runtime: RKLLMRuntime, t0: float, encoder: ImageEncoder | None = None
    ) -> None:
        with self._mutex:
            self.stats["loads"] += 1
            self._policy.loaded(req, entry, runtime, time.perf_counter() - t0, encoder)
            logger.info("loaded %s in %.2f s", entry.info.name, entry.load_time_s)
            swapping = self._swaps.loaded(entry.info.name, time.monotonic())
            closed = self._policy.closed
            if closed:
                self._policy.retire([entry])
            self._pump()
        if swapping:
            logger.warning("%s", swapping)
        if closed:
            self._close_unit(entry, runtime)

    def _close_entries(self, entries: list[LoadedModel]) -> None:
        """Destroy retired instances; each stays counted against the budget until its handle is gone."""
        for entry in entries:
            if entry.runtime is None:
                continue
            with self._mutex:
                self._watch_destroy(entry)
            try:
                entry.runtime.close()
            except Exception:  # pragma: no cover - close never raises for an idle handle
                logger.exception("closing %s failed", entry.info.name)
            with self._mutex:
                self.stats["unloads"] += 1
            logger.info("unloaded %s", entry.info.name)

    def _watch_destroy(self, entry: LoadedModel) -> None:
        """Free ``entry``'s room in the budget once its handle is destroyed (called with the lock held).

        A vision model's encoder is closed first (outside the lock: it may wait for an image
        being encoded); its memory counts until then.
        """
        assert entry.runtime is not None

        def destroyed() -> None:
            _close_encoder(entry)
            with self._mutex:
                self._policy.destroyed(entry)
                self._pump()

        if entry.runtime.when_destroyed(destroyed):
            if entry.encoder is None:
                self._policy.destroyed(entry)
            else:  # destroyed already (closed by its user): close the encoder off this locked thread
                threading.Thread(target=destroyed, name="rkllm-encoder-close", daemon=True).start()

    def _pump(self) -> None:
        """Let the policy serve the line, then do what it decided (called with the lock held).

        Handles closed by their users are retired first (their room is free once destroyed).
        Each lease books its handle's next turn as it is granted, so the requests the line
        serves together use the model in arrival order.
        """
        for entry in self._policy.closed_by_user():
            logger.info("%s was closed by its user; it will be reloaded when asked for", entry.info.name)
            self._watch_destroy(entry)
        decision = self._policy.pump()
        for req in decision.grants:
            granted = req.granted
            assert granted is not None and granted.runtime is not None
            if not req.loaded:
                self.stats["hits"] += 1
            lease = Lease(self, granted, req.owner, granted.runtime.reserve(req.owner))
            lease.sampling_policy = self.sampling_policy_for(granted.info)
            self._granted[req] = lease
        for w in decision.wake:
            w.wake()
        for w in self._watchers:
            w.wake()

    def _memory_shortfall_mb(self, info: ModelInfo) -> float:
        """MB the system lacks to load ``info`` (0 when enough, unknown, or pre-flight checks are off)."""
        on = self._preflight if self._preflight is not None else not self.library.is_simulator
        if not on:
            return 0.0
        available = preflight.memory_available_mb(preflight.SYSTEM_ROOT)
        size = info.file_size + (info.encoder_size if _has_encoder(info) else 0)
        return 0.0 if available is None else preflight.memory_needed_mb(size) - available

    def _release(self, entry: LoadedModel, owner: Hashable) -> None:
        with self._mutex:
            self._policy.release(entry, owner)
            self._pump()
            if entry.leases == 0 and self._keeps_for(entry.info.name) is not None:
                self._start_reaper()
                self._reaper_wake.notify_all()

    def _record(self, entry: LoadedModel, stats: PerfStats | None) -> None:
        with self._mutex:
            entry.runs += 1
            if stats is not None and stats.memory_usage_mb > 0 and len(self._policy.entries) == 1:
                entry.measured_mb = float(stats.memory_usage_mb)

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


def _has_encoder(info: ModelInfo) -> bool:
    """Whether ``info`` loads with an image encoder: a vision model with one paired."""
    return info.encoder is not None and info.kind == "vision"


def _vision_facts(info: ModelInfo) -> VisionFamily | None:
    """The family facts the encoder pads and normalises with; None when the family is not known."""
    from ..vision.families import vision_family

    overrides = info.defaults.vision_overrides
    if info.vision_family is None and not overrides:
        return None
    try:
        return vision_family(info.vision_family, overrides, model=info.name)
    except InvalidParameterError as exc:  # the registry reported it; the encoder pads with its default
        logger.debug("%s: %s", info.name, exc)
        return None


def _close_encoder(entry: LoadedModel) -> None:
    """Close an instance's image encoder, if it has one (idempotent; problems are logged)."""
    encoder = entry.encoder
    if encoder is None:
        return
    try:
        encoder.close()
    except RKLLMError:
        logger.exception("closing the image encoder of %s failed", entry.info.name)
    else:
        logger.debug("closed the image encoder of %s", entry.info.name)


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
    """Return the process-wide manager (created on first use with default settings).

    Its budget keeps as many models as fit in the memory available; ``RKLLM_MAX_LOADED``
    and ``RKLLM_MEMORY_BUDGET_MB`` override that. To choose everything, make a
    :class:`ModelManager` and pass it to :func:`set_default_manager` before the first use.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelManager()
        return _default


def set_default_manager(manager: ModelManager | None) -> ModelManager | None:
    """Make ``manager`` the process-wide manager; return the previous one (not closed).

    Every object created without ``manager=`` (``ChatRKLLM``, ``RKLLM``, the embedding
    and rerank classes, ``ChatEngine``) uses the process-wide manager, so one call
    sets the budget of a whole app::

        set_default_manager(ModelManager(max_loaded=2))

    ``None`` makes the next :func:`default_manager` call create a fresh one.
    """
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
