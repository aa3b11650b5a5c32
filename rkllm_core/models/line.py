"""The manager's line as pure state: who is served next, what to unload, which waits never end.

:class:`LinePolicy` holds what is loaded, what is dying and who waits, and
decides; it takes no lock, starts no thread and calls no native code, so it is
tested by driving it step by step. :class:`~rkllm_core.models.manager.ModelManager`
calls it under its mutex and does the I/O it decides on: loading, unloading,
waking waiters.

A vision model's image encoder belongs to its instance (one unit): its memory counts in the
instance's :attr:`LoadedModel.memory_mb` from the start of the load until the instance is
destroyed, and the two go together.

The budget (``max_loaded``, ``memory_budget_mb``) counts every model in memory:
the loaded ones, the one loading, and the *dying* ones — taken out of service but
not yet destroyed (an unload in progress, a handle its user closed while a run was
still in flight). A load starts only when the budget holds with all of them, so
no two models outgrow it at any instant, whatever races an unload, a close, a
failed load or a cancelled request.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .._sync import Waiter, describe_owner
from ..errors import BusyError
from ..params import InitParams
from ..runtime.handle import RKLLMRuntime
from .registry import ModelInfo

if TYPE_CHECKING:
    from ..vision.encoder import ImageEncoder

__all__ = ["KV_BYTES_PER_TOKEN", "Decision", "LinePolicy", "LoadedModel", "Request", "RequestState", "batch_kv_mb"]

Key = tuple[str, InitParams]


@dataclass(eq=False)
class LoadedModel:
    """Book-keeping for one instance in memory (read-only for callers).

    It is *loading* until its runtime is set; its lease count is the sum of its holders'.
    A vision model's image encoder (``encoder``) is loaded and unloaded with it; ``encoder_mb``
    is its share of the memory: the encoder file's size until the loaded encoder reports its own.
    """

    info: ModelInfo
    init: InitParams
    runtime: RKLLMRuntime | None = None
    slot: InitParams | None = None  # the settings it is keyed by, when not all of ``init`` (see Request)
    holders: Counter[Hashable] = field(default_factory=Counter)  # owner (thread or task) -> leases
    last_used: float = 0.0
    load_order: int = 0
    load_time_s: float = 0.0
    estimated_mb: float = 0.0
    measured_mb: float | None = None
    runs: int = 0
    encoder: ImageEncoder | None = None
    encoder_mb: float = 0.0

    @property
    def loading(self) -> bool:
        """True until the runtime handle exists."""
        return self.runtime is None

    @property
    def leases(self) -> int:
        """Leases held on this instance."""
        return sum(self.holders.values())

    @property
    def memory_mb(self) -> float:
        """The language model's measured memory when known, else its estimate; plus the encoder's."""
        return (self.measured_mb if self.measured_mb is not None else self.estimated_mb) + self.encoder_mb

    @property
    def key(self) -> Key:
        """(friendly name, init settings): what identifies the instance in the line."""
        return self.info.name, self.init if self.slot is None else self.slot


KV_BYTES_PER_TOKEN = 32 * 1024
"""The estimate of one slot's KV cache per context token: fp16 keys and values of a 0.5-3B model
with grouped-query attention (e.g. 28 layers x 2 x 256 x 2 bytes = 28 KiB for Qwen2.5-1.5B), rounded up."""


def batch_kv_mb(info: ModelInfo, params: InitParams | None) -> float:
    """The memory a batched instance needs beyond a single one: ``(n_batch - 1)`` more KV caches, in MB.

    A single instance's KV cache is inside the file-size estimate (and the runtime's
    measured peak); each extra slot holds one more cache of the instance's context
    length (``params.max_context_len``, else the model's), estimated at
    :data:`KV_BYTES_PER_TOKEN` per token.
    """
    slots = (params.n_batch if params is not None else None) or 1
    if params is None or slots < 2:
        return 0.0
    context = params.max_context_len or info.context_size
    return (slots - 1) * context * KV_BYTES_PER_TOKEN / (1024 * 1024)


class RequestState(enum.Enum):
    """Where a request is in its life: waiting, doing a load/unload, granted, or gone."""

    WAITING = "waiting"
    ACTING = "acting"
    GRANTED = "granted"
    LEFT = "left"


Action = tuple[Literal["load"], LoadedModel] | tuple[Literal["unload"], list[LoadedModel]]


class Request:
    """One request in the line.

    Args:
        info: the model asked for.
        params: its complete init settings: what an instance it loads is initialised with.
        waiter: how the requester is woken.
        chain: the instances the requester's own call chain holds.
        slot: the settings that select the instance, when not all of ``params``: an instance
            in that slot whose settings differ is re-initialised for the request (the 1.2
            ``reload`` sampling policy).
    """

    __slots__ = (
        "action",
        "chain",
        "error",
        "granted",
        "info",
        "key",
        "loaded",
        "params",
        "seq",
        "state",
        "victims",
        "waiter",
    )

    def __init__(
        self,
        info: ModelInfo,
        params: InitParams,
        waiter: Waiter,
        chain: set[LoadedModel],
        slot: InitParams | None = None,
    ) -> None:
        self.info = info
        self.params = params
        self.key: Key = (info.name, params if slot is None else slot)
        self.waiter = waiter
        self.chain = chain
        self.state = RequestState.WAITING
        self.granted: LoadedModel | None = None  # the instance it may use (its lease is made by the manager)
        self.error: BaseException | None = None
        self.action: Action | None = None  # a load or unload assigned to it, not yet taken
        self.victims: list[LoadedModel] | None = None  # what the head chose to unload for it
        self.loaded = False  # it loaded its model itself (its lease is not a cache hit)
        self.seq = 0  # arrival order

    @property
    def owner(self) -> Hashable:
        """Who asks (a thread or a task)."""
        return self.waiter.owner

    @property
    def pending(self) -> bool:
        """Waiting for its turn: nothing granted, assigned or failed yet."""
        return self.state is RequestState.WAITING and self.granted is None and self.error is None


@dataclass
class Decision:
    """What one pass over the line decided: leases to grant (in arrival order) and whom to wake."""

    grants: list[Request] = field(default_factory=list)
    wake: list[Waiter] = field(default_factory=list)


class LinePolicy:
    """The rules of the line (see :mod:`rkllm_core.models.manager` for the promises they keep).

    Args:
        max_loaded: most instances in memory at once (``None``: no limit).
        memory_budget_mb: most estimated memory in MB (``None``: no limit).
        shortfall_mb: MB the system lacks to load a model (0 when enough or unknown).
        clock: the time source of ``last_used``.
    """

    def __init__(
        self,
        max_loaded: int | None,
        memory_budget_mb: float | None,
        shortfall_mb: Callable[[ModelInfo], float] = lambda info: 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_loaded = max_loaded
        self.memory_budget_mb = memory_budget_mb
        self._shortfall_mb = shortfall_mb
        self._clock = clock
        self.entries: dict[Key, LoadedModel] = {}
        self.dying: set[LoadedModel] = set()  # out of service, handle not destroyed yet: still in memory
        self.line: list[Request] = []
        self.acting: Request | None = None  # the request currently loading or unloading
        self.unloading: dict[LoadedModel, int] = {}  # unload() waits for their leases: none for later arrivals
        self.closed = False
        self.min_models = 1
        """Models that fit whatever the memory budget says (the simulator's sparse files: 2)."""
        self._arrivals = 0
        self._load_counter = 0

    # -- arrivals and departures ----------------------------------------------------------------------
    def arrive(self, req: Request) -> None:
        """Put ``req`` in line, or raise ``BusyError`` if only its own chain could ever make room."""
        mine = [e for e in self.entries.values() if e in req.chain]
        if mine and req.key not in self.entries:
            if not self._fits(len(mine), sum(e.memory_mb for e in mine), self.estimate_mb(req.info, req.params)):
                raise BusyError(self._deadlock_message(req), reason="deadlock")
        self._arrivals += 1
        req.seq = self._arrivals
        self.line.append(req)

    def leave(self, req: Request) -> None:
        """``req`` is over (served, failed, timed out or cancelled): undo an assignment it will never do."""
        if req in self.line:
            self.line.remove(req)
        if req.state is not RequestState.GRANTED:
            req.state = RequestState.LEFT
        if req.action is not None:
            kind, payload = req.action
            if kind == "load":
                assert isinstance(payload, LoadedModel)
                self.entries.pop(payload.key, None)
            else:
                assert isinstance(payload, list)
                for victim in payload:
                    self.dying.discard(victim)
                    self.entries[victim.key] = victim
            req.action = None
            if self.acting is req:
                self.acting = None

    def take_action(self, req: Request) -> Action | None:
        """The load or unload assigned to ``req``, once (the caller then does it)."""
        action, req.action = req.action, None
        return action

    # -- what the I/O reports -------------------------------------------------------------------------
    def loaded(
        self,
        req: Request,
        entry: LoadedModel,
        runtime: RKLLMRuntime,
        load_time_s: float,
        encoder: ImageEncoder | None = None,
    ) -> None:
        """A load assigned to ``req`` succeeded (with the model's image encoder, for a vision model).

        The encoder's own report of its memory (``memory_bytes``) replaces the file-size estimate.
        """
        if encoder is not None:
            entry.encoder = encoder
            entry.encoder_mb = encoder.memory_bytes / (1024 * 1024)
        entry.runtime = runtime
        entry.load_time_s = load_time_s
        entry.last_used = self._clock()
        req.loaded = True
        self._done_acting(req)

    def load_failed(self, entry: LoadedModel, error: BaseException) -> list[Waiter]:
        """A load failed: every request waiting for that instance gets the same answer; return whom to wake."""
        self.entries.pop(entry.key, None)
        self.acting = None
        failed = [
            r
            for r in self.line
            if r.key == entry.key and r.state in (RequestState.WAITING, RequestState.ACTING) and r.error is None
        ]
        for other in failed:
            other.error = error
            other.state = RequestState.WAITING
        return [r.waiter for r in failed]

    def unloaded(self, req: Request) -> None:
        """An unload assigned to ``req`` is over (its handles are dying or destroyed)."""
        self._done_acting(req)

    def _done_acting(self, req: Request) -> None:
        self.acting = None
        if req.state is RequestState.ACTING:
            req.state = RequestState.WAITING

    def retire(self, entries: list[LoadedModel]) -> None:
        """Take ``entries`` out of service; until :meth:`destroyed` they still count against the budget."""
        for e in entries:
            if self.entries.get(e.key) is e:
                del self.entries[e.key]
            if e.runtime is not None:
                self.dying.add(e)

    def destroyed(self, entry: LoadedModel) -> None:
        """The handle of a retired instance is destroyed: its memory is free."""
        self.dying.discard(entry)

    def closed_by_user(self) -> list[LoadedModel]:
        """Retire the instances whose users closed their handles; return them."""
        gone = [e for e in self.entries.values() if e.runtime is not None and e.runtime.closed]
        self.retire(gone)
        return gone

    def mark_unloading(self, entries: set[LoadedModel]) -> None:
        """``unload()`` waits for these: requests that arrive from now on wait for it, not the reverse."""
        for e in entries:
            self.unloading.setdefault(e, self._arrivals)

    def unmark_unloading(self, entries: set[LoadedModel]) -> None:
        """``unload()`` stopped waiting for these."""
        for e in entries:
            self.unloading.pop(e, None)

    def grant(self, req: Request, entry: LoadedModel) -> None:
        """Give ``req`` the use of ``entry``."""
        entry.holders[req.owner] += 1
        entry.last_used = self._clock()
        req.granted = entry
        req.state = RequestState.GRANTED

    def release(self, entry: LoadedModel, owner: Hashable) -> None:
        """A lease of ``owner`` on ``entry`` ended."""
        entry.holders[owner] -= 1
        if entry.holders[owner] <= 0:
            del entry.holders[owner]
        entry.last_used = self._clock()

    def close(self) -> list[LoadedModel]:
        """No more loads; fail every waiting request; return the loaded instances, newest first."""
        self.closed = True
        entries = sorted(self.entries.values(), key=lambda e: e.load_order, reverse=True)
        self.entries.clear()
        self.unloading.clear()
        return entries

    # -- serving the line -------------------------------------------------------------------------------
    def pump(self) -> Decision:
        """Serve the line after any change; return the leases to grant and the waiters to wake.

        In arrival order, requests for loaded models are granted; the earliest request
        whose model is not loaded (the head) plans its load or swap when nothing else is
        loading or unloading, marking the models it must unload as draining, after which
        later requests for those models wait behind it. A swap whose every blocker is
        itself stuck in the line is refused.
        """
        for gone in [e for e in self.unloading if self.entries.get(e.key) is not e]:
            del self.unloading[gone]
        decision = Decision()
        waiting = [r for r in self.line if r.pending]
        head = None
        if self.acting is None and not self.closed:
            head = next((r for r in waiting if r.key not in self.entries or self._stale(r)), None)
        draining = self._serve(waiting, head, decision)
        if head is not None and draining:
            self._refuse_stuck_swap(head, decision)
        return decision

    def _serve(self, waiting: list[Request], head: Request | None, decision: Decision) -> bool:
        """Grant in arrival order around the head's plan; True if the head waits for models to drain."""
        draining: set[LoadedModel] = set()
        before_head = True
        for req in waiting:
            if req is head:
                before_head = False
                if self._plan_room(head):
                    decision.wake.append(head.waiter)
                else:
                    draining.update(head.victims or ())
                continue
            entry = self.entries.get(req.key)
            if entry is None or entry.loading or entry.init != req.params:
                continue
            if entry not in req.chain:  # a chain that holds the model already never waits for it
                if req.seq > self.unloading.get(entry, req.seq) or (entry in draining and not before_head):
                    continue  # waits behind the unload, or the swap that chose this model
            self.grant(req, entry)
            decision.grants.append(req)
            decision.wake.append(req.waiter)
        return bool(draining)

    def _refuse_stuck_swap(self, head: Request, decision: Decision) -> None:
        blockers = {owner for v in head.victims or () for owner in v.holders}
        stuck = {r.owner for r in self.line if r is not head and r.pending}
        if blockers and blockers <= stuck:
            head.victims = None
            head.error = BusyError(
                f"{head.info.name} needs the room of models whose every user is itself waiting in line for a "
                "model: waiting would never end (raise max_loaded/memory_budget_mb, or release leases "
                "before asking for another model)",
                reason="deadlock",
            )
            decision.wake.append(head.waiter)

    def _stale(self, req: Request) -> bool:
        """The instance in ``req``'s slot is loaded with other settings: it must be re-initialised."""
        entry = self.entries.get(req.key)
        return entry is not None and not entry.loading and entry.init != req.params

    def _plan_room(self, req: Request) -> bool:
        """Decide for the head of the load line; True if it was given something to do (or refused)."""
        if self._stale(req):
            return self._plan_reload(req, self.entries[req.key])
        victims = req.victims
        if victims is None or any(self.entries.get(v.key) is not v for v in victims):
            victims = req.victims = self._choose_victims(req)
        if victims is None:
            if self.dying:
                return False  # memory is still being freed: wait for the destroys
            req.error = BusyError(self._deadlock_message(req), reason="deadlock")
            return True
        if not victims:
            if not self._fits_with_dying(req):
                return False  # the budget holds only once the dying handles are gone
            self._load_counter += 1
            entry = LoadedModel(
                info=req.info,
                init=req.params,
                slot=req.key[1] if req.key[1] != req.params else None,
                load_order=self._load_counter,
                estimated_mb=self.estimate_mb(req.info, req.params) - self.encoder_estimate_mb(req.info),
                encoder_mb=self.encoder_estimate_mb(req.info),
            )
            self.entries[req.key] = entry
            self._assign(req, ("load", entry))
            return True
        if all(v.leases == 0 for v in victims):
            self.retire(victims)
            req.victims = None
            self._assign(req, ("unload", victims))
            return True
        return False

    def _plan_reload(self, req: Request, entry: LoadedModel) -> bool:
        """Unload the instance in ``req``'s slot once idle, so it can be loaded again with ``req``'s settings."""
        req.victims = [entry]
        if entry in req.chain:
            req.victims = None
            req.error = BusyError(self._deadlock_message(req), reason="deadlock")
            return True
        if entry.leases:
            return False  # it drains: its running requests finish, later ones wait behind this reload
        self.retire([entry])
        req.victims = None
        self._assign(req, ("unload", [entry]))
        return True

    def _assign(self, req: Request, action: Action) -> None:
        self.acting = req
        req.state = RequestState.ACTING
        req.action = action

    def _fits(self, count: int, used_mb: float, need_mb: float) -> bool:
        count_ok = self.max_loaded is None or count + 1 <= self.max_loaded
        mem_ok = self.memory_budget_mb is None or count < self.min_models or used_mb + need_mb <= self.memory_budget_mb
        return count_ok and mem_ok

    def _fits_with_dying(self, req: Request) -> bool:
        present = [*self.entries.values(), *self.dying]
        return self._fits(len(present), sum(e.memory_mb for e in present), self.estimate_mb(req.info, req.params))

    def _choose_victims(self, req: Request) -> list[LoadedModel] | None:
        """[] if the model fits beside what is loaded; the models to unload for it; None if only its own could.

        Beyond the budget, idle models are also unloaded while the system lacks the
        memory the load needs (if unloading them can cover it).
        """
        entries = list(self.entries.values())
        need = self.estimate_mb(req.info, req.params)
        count, used = len(entries), sum(e.memory_mb for e in entries)
        short = self._shortfall_mb(req.info) + batch_kv_mb(req.info, req.params)
        if self._fits(count, used, need) and short <= 0:
            return []
        waiting = {r.owner for r in self.line if r.state is RequestState.WAITING}
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

    def _deadlock_message(self, req: Request) -> str:
        mine = ", ".join(e.info.name for e in self.entries.values() if e in req.chain) or "nothing"
        return (
            f"{describe_owner(req.owner)} holds {mine} and asks for {req.info.name}, which needs that room: "
            "it would wait for itself. Finish (or close the stream of) the first request before asking for "
            "another model, or raise max_loaded/memory_budget_mb"
        )

    # -- facts ------------------------------------------------------------------------------------------
    def estimate_mb(self, info: ModelInfo, params: InitParams | None = None) -> float:
        """The memory ``info`` takes: measured on an instance of it when known, else its file size.

        An instance loaded with ``params.n_batch`` slots also counts the KV caches of its
        extra slots (:func:`batch_kv_mb`); a measurement counts only for an instance with as
        many slots. A model with an image encoder adds :meth:`encoder_estimate_mb`.
        """
        n_batch = (params.n_batch if params is not None else None) or 1
        encoder_mb = self.encoder_estimate_mb(info)
        for (name, _), e in self.entries.items():
            if name == info.name and e.measured_mb is not None and (e.init.n_batch or 1) == n_batch:
                return e.measured_mb + encoder_mb
        return info.file_size / (1024 * 1024) + batch_kv_mb(info, params) + encoder_mb

    def encoder_estimate_mb(self, info: ModelInfo) -> float:
        """The memory ``info``'s image encoder takes: as a loaded instance's encoder reported it, else its file size."""
        if info.encoder is None:
            return 0.0
        for (name, _), e in self.entries.items():
            if name == info.name and e.encoder is not None:
                return e.encoder_mb
        return info.encoder_size / (1024 * 1024)

    def describe(self) -> str:
        """What is loaded and how busy, for messages."""
        return ", ".join(f"{e.info.name} ({e.leases} in use)" for e in self.entries.values()) or "none loaded"
