"""A safe handle on one loaded model: sessions, runs, the KV cache's state, close.

Thread and task model:

* **One caller at a time.** Work on a handle happens in a :class:`Session`: exclusive
  use of the handle, taken in arrival order from threads and tasks alike
  (``with rt.session() as s`` / ``async with rt.session() as s``; awaiting occupies
  no thread, cancelling leaves the line at once, ``timeout=`` raises
  :class:`~rkllm_core.errors.BusyError`). The one-shot methods (:meth:`RKLLMRuntime.stream`,
  :meth:`~RKLLMRuntime.generate`, :meth:`~RKLLMRuntime.clear_kv_cache`, …) each take
  a session of their own. A caller that asks for a handle it already holds gets
  ``BusyError`` at once instead of waiting for itself.
* **Runs.** The handle's worker thread (one per handle, started at its first run)
  calls the blocking ``rkllm_run`` (see :mod:`.run`). Letting go of a session while
  its run is still going (an async stream that was cancelled, a one-shot stream)
  does not wait: the worker hands the handle on when ``rkllm_run`` returns, so the
  next caller never overlaps a run.
* **The KV cache's state lives here.** :attr:`RKLLMRuntime.kv` says what the cache
  holds: an ``epoch`` that every run, clear, template or tools change and
  prompt-cache load moves on, and a ``tag`` that a session may declare after a
  run (:meth:`Session.mark_kv`). Whoever used the handle in between — another chat
  engine, a direct ``generate()`` — moved the epoch and reset the tag, so a reader
  can tell exactly whether the cache still holds its conversation.
* **Close.** ``close()`` is idempotent: it refuses new work, aborts the current run
  and destroys the handle once nobody is using it (waiting, bounded, when another
  caller holds it). The garbage-collection safety net never waits: if the handle
  is in use, the caller that lets go of it destroys it. ``rkllm_destroy`` is never
  called while a run is going or a native call is in flight.
* **Batched runs.** A handle made with ``InitParams(n_batch=N)``, N > 1, takes N inputs
  in every run, so it runs only :meth:`RKLLMRuntime.batch` (see :mod:`.batch`); a
  single run there is refused. A batched run is a run like any other for the rules
  above, and afterwards the KV state is unknown (``keep_history`` is always 0).
* **Images.** ``stream(prompt, images=[...], image_size=(h, w))`` (and every run method,
  sync or async) sends a multimodal run: one ``<image>`` per image in ``prompt``, the
  embeddings (:class:`rkllm_core.vision.ImageEmbedding`) concatenated image after image,
  ``image_size`` the encoder's input. Tags are :attr:`InitParams.image_tags` (set at init on
  1.2, so part of the instance; on 1.3 the default of ``image_tags=`` per run). Counts, sizes
  and one-image families on 1.2 (``multi_image_abi12=False``, or :meth:`RKLLMRuntime.check_images`)
  are refused before any native call; the embedding buffer lives until ``rkllm_run`` returns.
  After :meth:`Session.mark_kv`, :attr:`KVState.images` lists the digests of the images the
  cache holds (``image_digests=``, default SHA-256 of each embedding).
* **Exit.** Every run is aborted and waited for before Python joins non-daemon
  threads; after that, a handle still held by code that can never run again (a
  generator left suspended, a task whose loop stopped) is destroyed.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeVar, Unpack

from .. import preflight as preflight_checks
from .._sync import (
    NESTED_GRACE_TURNS,
    FifoLock,
    Reservation,
    current_owner,
    describe_owner,
    held_items,
    hold,
    on_event_loop,
    submit,
    unhold,
)
from ..errors import (
    BusyError,
    HandleClosedError,
    InitError,
    InvalidParameterError,
    ModelFileError,
    NativeError,
    RunError,
)
from ..filenames import parse_model_filename
from ..native.backend import Backend, InferMode, RunRequest
from ..native.backend import encode_path as _c_path
from ..native.backend import encode_text as _c_text
from ..native.library import RuntimeLibrary, load_library
from ..native.multimodal import ImageInput, check_image_count
from ..params import (
    FinishReason,
    ImageTags,
    InitParams,
    PerfStats,
    SamplingParams,
    StreamChunk,
    Tensor,
    context_len,
)
from .batch import FILLER_PROMPT, BatchInput, BatchOptions, BatchRun, plan_batch
from .run import ABORT_WAIT_S, Run, RunStream, RunWorker, astream_run
from .setup import ChatSetup, ChatTemplate, FunctionTools

logger = logging.getLogger(__name__)

Role = Literal["user", "tool"]
_T = TypeVar("_T")

__all__ = [
    "Completion",
    "InferMode",
    "KVState",
    "RKLLMRuntime",
    "Role",
    "RunOptions",
    "RunStream",
    "Session",
    "SessionState",
]


_IMAGE_OPTIONS = ("image_size", "image_tags", "image_digests", "multi_image_abi12")


class RunOptions(TypedDict, total=False):
    """Per-run options of :meth:`RKLLMRuntime.stream` / :meth:`RKLLMRuntime.astream`."""

    role: Role
    """"user", or "tool" for function results (a JSON array)."""
    enable_thinking: bool
    """Switch the template's thinking mode (Qwen3)."""
    keep_history: bool
    """Keep this turn in the KV cache for the next run."""
    sampling: SamplingParams | None
    """Per-run sampling (1.3 only)."""
    max_new_tokens: int | None
    """Per-run limit (1.3 only; <= 0 means the init value)."""
    lora: str | None
    """The name of a loaded LoRA adapter to apply."""
    save_prompt_cache: str | os.PathLike[str] | None
    """Write this run's prefill state to this file."""
    token_ids: Sequence[int] | None
    """Token input instead of a prompt."""
    mode: InferMode
    """``"generate"`` (text), or ``"hidden"`` / ``"logits"``: no text, the run returns a :class:`Tensor`."""
    images: Sequence[ImageInput]
    """Image embeddings (:class:`rkllm_core.vision.ImageEmbedding`), one per ``<image>`` of the prompt, in
    order; the run goes as multimodal input (the embeddings concatenated image after image)."""
    image_size: tuple[int, int] | None
    """With ``images``: the encoder's input (height, width) in pixels (``EncoderGeometry``)."""
    image_tags: ImageTags | None
    """With ``images`` on 1.3: the family's tags (default :attr:`InitParams.image_tags`); on 1.2 the
    tags are the instance's (set at init) and a different value is refused."""
    image_digests: Sequence[str] | None
    """One digest per image for :attr:`KVState.images` (default: SHA-256 of each embedding)."""
    multi_image_abi12: bool
    """False for a family that takes one image per prompt on the 1.2 runtime (Qwen3-VL): several are refused."""


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of a whole (non-streamed) run."""

    text: str
    finish_reason: FinishReason
    stats: PerfStats | None
    tokens: int


@dataclass(frozen=True, slots=True)
class KVState:
    """What a handle's KV cache holds, as far as the handle knows.

    Attributes:
        epoch: moves on at every run, clear, template or tools change and prompt-cache load or release.
        tag: what the last session declared the cache holds after its run (:meth:`Session.mark_kv`);
            ``None`` when unknown (anything touched the cache since).
        tokens: positions in the cache when last read, or ``None`` when unknown.
        images: the digests of the images the cache holds, in order, declared with ``tag``: a
            follow-up turn that finds its tag and its images here need not prefill them again.
    """

    epoch: int = 0
    tag: Hashable | None = None
    tokens: int | None = 0
    images: tuple[str, ...] = ()


class _HandleState:
    """Everything about one native handle; shared by its runtime object, sessions, runs and finalizer.

    It never references the :class:`RKLLMRuntime`, so dropping that object lets
    the finalizer run. ``mutex`` guards the fields below it.
    """

    def __init__(
        self,
        backend: Backend,
        handle: int,
        keepalive: tuple[Any, ...],
        name: str,
        *,
        max_new_tokens: int = -1,
        n_batch: int = 1,
        base_sampling: SamplingParams | None = None,
        image_tags: ImageTags | None = None,
    ) -> None:
        self.backend = backend
        self.image_tags = image_tags  # the instance's image tags (1.2: set at init; 1.3: runs' default)
        self.fns = backend.functions
        self.handle = handle
        self.keepalive = keepalive  # the param struct, the model path, the 1.3 callback struct
        self.name = name
        self.max_new_tokens = max_new_tokens  # the init value (<= 0: the runtime's own limit)
        self.n_batch = n_batch
        self.base_sampling = base_sampling  # every sampling value a run uses when it sets none
        self.lock = FifoLock()
        self.destroyed_event = threading.Event()
        self.mutex = threading.Lock()
        self.closed = False
        self.destroyed = False
        self.current: Run | None = None  # a run whose rkllm_run has not returned
        self.worker = RunWorker(name)  # makes the rkllm_run calls; stopped when the handle is destroyed
        self.jobs = 0  # native calls in flight on the core's executor for the holder
        self.release_pending = False  # the holder let go while a run or job was in flight
        self.kv = KVState()
        self.chat_setup: ChatSetup | None = None  # last template / tools installed
        self.prompt_cache: str | None = None  # the loaded prompt cache file
        self.on_destroyed: list[Callable[[], None]] = []  # called once the native handle is gone
        self.kv_unknown_epoch = -1  # the KV epoch in which a run was cut by the binding's own limit
        self.run_images: tuple[str, ...] = ()  # the images the cache holds after the current epoch's run

    # -- runs and jobs ----------------------------------------------------------------------------
    def request(self, prompt: str | None, **options: Unpack[RunOptions]) -> RunRequest:
        """Validate a run on this handle (see :meth:`~rkllm_core.native.backend.Backend.run_request`).

        Raises:
            HandleClosedError: the handle was closed.
            InvalidParameterError: bad arguments (nothing reaches the runtime).
        """
        if self.closed:
            raise HandleClosedError(f"the runtime handle for {self.name} is closed")
        opts: dict[str, Any] = dict(options)
        images = opts.pop("images", ())
        image_opts = {k: opts.pop(k) for k in _IMAGE_OPTIONS if k in opts}
        multimodal = None
        if images:
            multimodal = self.backend.image_request(prompt, images, init_image_tags=self.image_tags, **image_opts)
        elif any(v is not None for k, v in image_opts.items() if k != "multi_image_abi12"):
            raise InvalidParameterError(f"{', '.join(image_opts)} given without images")
        return self.backend.run_request(prompt, base_sampling=self.base_sampling, multimodal=multimodal, **opts)

    def abort_run(self, run: Run) -> bool:
        """Abort ``run`` if it is still the current run (never another caller's later run)."""
        with self.mutex:  # held across the call so no new run can start in between
            if self.current is not run or run.returned:
                return False
            run.aborted = True
            rc = self.backend.abort(self.handle)
        if rc != 0:
            logger.warning("rkllm_abort returned %d", rc)
        return True

    def abort_soon(self, run: Run) -> None:
        """Abort ``run`` from the core's executor (for async code: no native call on the loop)."""
        if not run.returned:
            submit(self.abort_run, run)

    def abort_current(self) -> bool:
        with self.mutex:
            run = self.current
        return self.abort_run(run) if run is not None else False

    def run_ended(self, run: Run) -> None:
        """Called by the worker once ``rkllm_run`` has returned."""
        with self.mutex:
            if self.current is run:
                self.current = None
            if run.cut or run.batched:  # past a cut, or after a batch, nobody may claim to know what it holds
                self.kv_unknown_epoch = self.kv.epoch
            unlock = self._take_pending()
        if unlock:
            self.unlock()

    def job_ended(self) -> None:
        with self.mutex:
            self.jobs -= 1
            unlock = self._take_pending()
        if unlock:
            self.unlock()

    def _take_pending(self) -> bool:
        if self.release_pending and self.current is None and self.jobs == 0:
            self.release_pending = False
            return True
        return False

    def let_go(self) -> None:
        """The holder is done; hand the handle on now, or when its run / job ends."""
        with self.mutex:
            if self.current is not None or self.jobs:
                self.release_pending = True
                return
        self.unlock()

    def unlock(self) -> None:
        """Release the lock (the caller holds it and nothing is in flight); destroy first if closed.

        On an event loop the destroy (a native call that may take a while) is left to
        the core's executor, which releases the lock once it is done.
        """
        if self.closed and not self.destroyed:
            if on_event_loop():
                submit(self.unlock)
                return
            self._destroy()
        self.lock.release()

    def _destroy(self) -> None:
        """Stop the run worker and destroy the native handle (once; nothing may be in flight)."""
        with self.mutex:
            if self.destroyed:
                return
            self.destroyed = True
        self.worker.stop()
        try:
            rc = self.backend.destroy(self.handle)
            if rc != 0:
                logger.warning("rkllm_destroy returned %d for %s", rc, self.name)
        finally:
            with self.mutex:
                self.destroyed_event.set()
                callbacks, self.on_destroyed = self.on_destroyed, []
            logger.info("closed %s", self.name)
            for fn in callbacks:
                try:
                    fn()
                except Exception:  # pragma: no cover - a listener's bug must not break the destroy
                    logger.exception("a listener of %s's destroy failed", self.name)

    def when_destroyed(self, fn: Callable[[], None]) -> bool:
        """Call ``fn`` once the native handle is destroyed; True (and no call) if it already is."""
        with self.mutex:
            if self.destroyed_event.is_set():
                return True
            self.on_destroyed.append(fn)
            return False

    # -- close ----------------------------------------------------------------------------------------
    def close(self, wait: float | None) -> bool:
        """Refuse new work, abort the run, destroy when free. Returns True once destroyed.

        With ``wait`` (seconds), waits for another holder to let go; never waits
        for a handle the calling thread or task holds itself.
        """
        if self.destroyed:
            return True
        self.closed = True
        self.abort_current()
        if self.lock.try_acquire(owner=_CLOSER):
            if self.destroyed:
                self.lock.release()
            else:
                self.unlock()
            return True
        if _exiting and self._holder_gone():
            return self._destroy_abandoned()
        if not wait or self.lock.owner is current_owner():
            return self.destroyed  # whoever lets go of the handle destroys it
        if not self.destroyed_event.wait(wait):
            logger.error("%s is still in use %.0f s after close(); it is destroyed when released", self.name, wait)
        return self.destroyed

    def _holder_gone(self) -> bool:
        """At exit: True when the lock's holder can never let go of it.

        That is the exiting thread itself (a generator or session it left
        suspended), a thread that has ended, or a task whose event loop no longer
        runs. Once every non-daemon thread has been joined, nobody else can
        resume such a holder.
        """
        owner = self.lock.owner
        if owner is current_owner():
            return True
        if isinstance(owner, threading.Thread):
            return not owner.is_alive()
        if isinstance(owner, asyncio.Task):
            return not owner.get_loop().is_running()
        return False

    def _destroy_abandoned(self) -> bool:
        """Destroy a closed handle whose holder will never let go, unless a native call is in flight.

        Safe because the handle is closed: every native call a holder could still
        make checks that first, and the lock is still released as usual if the
        holder is ever finalised.
        """
        with self.mutex:
            busy = self.current is not None or self.jobs > 0
        if not busy:
            self._destroy()
        return self.destroyed


_CLOSER = object()  # the owner recorded while close() holds the lock


def _finalize(state: _HandleState) -> None:
    state.close(wait=None)  # the GC safety net never blocks


_live: weakref.WeakSet[_HandleState] = weakref.WeakSet()


_exiting = False  # set once every non-daemon thread has been joined at interpreter exit


def _stop_everything_at_exit() -> None:
    """At interpreter exit, before non-daemon threads are joined: refuse new work, end every run.

    A thread still streaming would otherwise keep the process alive for its
    whole generation. Every run is aborted and its worker waited for (bounded)
    while threads can still run: later, while the interpreter is finalising, a
    daemon worker could never report its run's return, and a stream closed then
    (a generator left suspended) would wait for it in vain. A handle whose run
    was its holder's last use is destroyed by the worker; the handles that are
    still held are dealt with once the non-daemon threads have been joined
    (:func:`_destroy_abandoned_at_exit`).
    """
    states = list(_live)
    for state in states:
        state.closed = True
        try:
            state.abort_current()
        except Exception:  # pragma: no cover - interpreter teardown
            logger.debug("abort at exit failed", exc_info=True)
    deadline = time.monotonic() + ABORT_WAIT_S
    for state in states:
        if not state.worker.stop(max(0.0, deadline - time.monotonic())):
            logger.error("a run on %s did not return %.0f s after rkllm_abort", state.name, ABORT_WAIT_S)
    if _threading_exit_hook is not None:
        atexit.register(_destroy_abandoned_at_exit)  # the last registered runs first, after the joins
    else:  # pragma: no cover - Pythons without threading's exit hooks: this already runs after the joins
        _destroy_abandoned_at_exit()


def _destroy_abandoned_at_exit() -> None:
    """After the non-daemon threads are joined: destroy handles held by code that will never run again.

    A generator or async generator left suspended (or a session never left) by
    the exiting thread, or by a task whose loop has stopped, would otherwise
    keep its handle until interpreter teardown happens to collect it, or forever.
    Handles held by live daemon threads are left to them (closing waits for them).
    """
    global _exiting
    _exiting = True
    for state in list(_live):
        try:
            state.close(wait=None)
        except Exception:  # pragma: no cover - interpreter teardown
            logger.debug("close at exit failed", exc_info=True)


# threading's own exit hooks run before non-daemon threads are joined (atexit runs after): use them
# where this Python has them, else atexit (then a streaming thread delays exit until its run ends).
_threading_exit_hook: Callable[[Callable[[], None]], None] | None = getattr(threading, "_register_atexit", None)
(_threading_exit_hook or atexit.register)(_stop_everything_at_exit)


class SessionState(enum.Enum):
    """Where a :class:`Session` is in its life; it never goes back."""

    NEW = 1
    """Not entered yet."""
    ACTIVE = 2
    """Holds the handle."""
    CLOSED = 3
    """Let go of the handle, or never got it (a timeout, a closed handle); cannot be entered again."""


class Session:
    """Exclusive use of a handle for a sequence of calls and runs.

    ``with rt.session(timeout) as s`` (threads) or ``async with rt.session(timeout) as s``
    (tasks). While it is held nobody else can run or change the handle, so what
    :attr:`kv` says stays true until the session itself changes it. Methods mirror
    :class:`RKLLMRuntime`'s without taking the handle again. A session is used by one
    caller at a time and cannot be re-entered.
    """

    def __init__(self, runtime: RKLLMRuntime, timeout: float | None = None) -> None:
        self._rt = runtime
        self._state = runtime._state
        self._timeout = timeout
        self._life = SessionState.NEW

    # -- taking and letting go ----------------------------------------------------------------------
    def _nested(self) -> bool:
        """True when the calling chain already holds this handle (it would wait for itself)."""
        return any(isinstance(x, Session) and x._state is self._state for x in held_items())

    def _check_free(self, owner: Hashable) -> None:
        state = self._state
        if state.closed:
            raise HandleClosedError(f"the runtime handle for {state.name} is closed")
        if self._life is not SessionState.NEW:
            raise InvalidParameterError("a session can be entered only once")
        if self._nested():
            raise BusyError(
                f"{describe_owner(owner)} already holds {state.name} and asks for it again (a nested request, e.g. "
                "from inside its own stream or a callback); finish or close the first request before starting another",
                reason="deadlock",
            )

    def _acquired(self, ok: bool) -> Session:
        if not ok:
            self._life = SessionState.CLOSED
            raise BusyError(
                f"{self._state.name} stayed busy for {self._timeout} s; try again later",
                reason="timeout",
                waited=self._timeout,
            )
        if self._state.closed:
            self._life = SessionState.CLOSED
            self._state.unlock()
            raise HandleClosedError(f"the runtime handle for {self._state.name} is closed")
        self._life = SessionState.ACTIVE
        hold(self)
        return self

    def acquire(self, timeout: float | None = None, owner: Hashable | None = None) -> Session:
        """Wait in line for the handle (``timeout`` defaults to the session's)."""
        me = owner if owner is not None else current_owner()
        self._check_free(me)
        wait = self._timeout if timeout is None else timeout
        return self._acquired(self._state.lock.acquire(wait, owner=me))

    async def acquire_async(self, timeout: float | None = None) -> Session:
        """Like :meth:`acquire` without occupying a thread; cancelling leaves the line at once."""
        me = current_owner()
        for _ in range(NESTED_GRACE_TURNS):  # a dropped async stream of ours may be closing right now
            if not self._nested():
                break
            await asyncio.sleep(0)
        self._check_free(me)
        wait = self._timeout if timeout is None else timeout
        return self._acquired(await self._state.lock.acquire_async(wait, owner=me))

    def release(self) -> None:
        """Let go of the handle (idempotent). Never waits: a run still going hands it on when it ends."""
        if self._life is not SessionState.ACTIVE:
            return
        self._life = SessionState.CLOSED
        unhold(self)
        self._state.let_go()

    def __enter__(self) -> Session:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Session:
        return await self.acquire_async()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    @property
    def active(self) -> bool:
        """True while the session holds the handle."""
        return self._life is SessionState.ACTIVE

    @property
    def state(self) -> SessionState:
        """Where the session is in its life."""
        return self._life

    holding = active

    @property
    def runtime(self) -> RKLLMRuntime:
        """The handle this session is on."""
        return self._rt

    # -- state ------------------------------------------------------------------------------------------
    @property
    def kv(self) -> KVState:
        """What the KV cache holds (see :class:`KVState`)."""
        return self._state.kv

    @property
    def chat_setup(self) -> ChatSetup | None:
        """The last template or tools installed (:mod:`~rkllm_core.runtime.setup`), or ``None`` for the model's own."""
        return self._state.chat_setup

    @property
    def prompt_cache(self) -> str | None:
        """The prompt-cache file loaded into the handle, if any."""
        return self._state.prompt_cache

    def abort(self) -> bool:
        """Abort this session's run, if one is going; does not wait. True if a run was aborted."""
        run = self._state.current
        return self._state.abort_run(run) if run is not None and self.active else False

    def abort_soon(self) -> None:
        """Like :meth:`abort`, with the native call made from the core's executor (for async code)."""
        run = self._state.current
        if run is not None and self.active:
            self._state.abort_soon(run)

    def mark_kv(self, tag: Hashable | None, tokens: int | None = None) -> None:
        """Declare what the KV cache holds now (after this session's run ended cleanly).

        After a run the binding cut at its own token limit (``max_new_tokens`` on the 1.2
        ABI) the tag is not recorded: the runtime may have put a token or two past the cut
        into the cache before the abort landed, so nobody can say what it holds exactly,
        and the next request rebuilds.
        """
        self._ready()
        state = self._state
        if state.kv_unknown_epoch == state.kv.epoch:
            tag = None
        images = state.run_images if tag is not None else ()
        state.kv = KVState(state.kv.epoch, tag, state.kv.tokens if tokens is None else tokens, images)

    def _ready(self) -> _HandleState:
        state = self._state
        if not self.active:
            raise InvalidParameterError("the session is not active (enter it with `with` / `async with`)")
        if state.closed:
            raise HandleClosedError(f"the runtime handle for {state.name} is closed")
        if state.current is not None:
            raise BusyError(f"a run is still going on {state.name}; finish or close its stream first", reason="busy")
        return state

    def _moved(self, tokens: int | None, images: tuple[str, ...] = ()) -> None:
        """Move the KV epoch on; ``images``: what the cache holds after the run that moved it."""
        state = self._state
        state.run_images = images
        state.kv = KVState(state.kv.epoch + 1, None, tokens)

    def _check(self, rc: int, name: str) -> None:
        if rc != 0:
            raise NativeError(f"{name} failed (code {rc})", code=rc, function=name)

    # -- runs ---------------------------------------------------------------------------------------------
    def _start(self, req: RunRequest) -> Run:
        state = self._ready()
        if state.n_batch > 1:  # the runtime would read n_batch inputs where one was given
            raise InvalidParameterError(
                f"{state.name} was initialised with n_batch={state.n_batch}: every run takes "
                f"{state.n_batch} inputs; use batch() (a single run needs n_batch=1)"
            )
        inp, infer, keep = state.backend.run_structs(req)
        run = Run(_run_limit(state.max_new_tokens, req), keep)
        with state.mutex:
            state.current = run
        self._moved(None, _images_after(state.kv, req))
        try:
            state.worker.submit(state, run, inp, infer, req.tensor, req.stop_after)
        except BaseException:
            with state.mutex:
                state.current = None
            raise
        return run

    def _start_batch(self, reqs: list[RunRequest], n_prompts: int) -> BatchRun:
        """Start a batched run of ``reqs`` (see :func:`~rkllm_core.runtime.batch.plan_batch`)."""
        state = self._ready()
        inputs, infer, keep = state.backend.batch_structs(reqs)
        host = Run(_run_limit(state.max_new_tokens, reqs[0]), keep)
        host.batched = True  # keep_history is 0: afterwards the cache holds nothing reusable
        with state.mutex:
            state.current = host  # first: an abort from a slot detached at once finds the run
        self._moved(None)
        try:
            batch = BatchRun(host, n_prompts, len(reqs), reqs[0].stop_after, state.abort_run, state.abort_soon)
            state.worker.enqueue(state, host, batch.run_id, batch.channel, inputs, infer)
        except BaseException:
            with state.mutex:
                state.current = None
            raise
        return batch

    def batch(
        self, prompts: Sequence[str | BatchInput], *, filler: str = FILLER_PROMPT, **options: Unpack[BatchOptions]
    ) -> BatchRun:
        """Start a batched run in this session (see :meth:`RKLLMRuntime.batch`)."""
        reqs = plan_batch(self._state.request, prompts, self._state.n_batch, filler, options)
        return self._start_batch(reqs, len(prompts))

    def stream(self, prompt: str | None = None, **options: Unpack[RunOptions]) -> RunStream:
        """Start a run in this session and return its chunk stream (see :meth:`RKLLMRuntime.stream`)."""
        req = self._state.request(prompt, **options)
        return RunStream(lambda: self._start(req), self._state.abort_run)

    async def astream(self, prompt: str | None = None, **options: Unpack[RunOptions]) -> AsyncIterator[StreamChunk]:
        """Async :meth:`stream`; closing early or cancelling aborts the run without waiting for it."""
        run = self._start(self._state.request(prompt, **options))
        async for chunk in astream_run(run, self._state.abort_soon):
            yield chunk

    def generate(self, prompt: str | None = None, **options: Unpack[RunOptions]) -> Completion:
        """Run to the end in this session and return the whole text."""
        return _collect(self.stream(prompt, **options))

    def infer(self, prompt: str | None = None, **options: Unpack[RunOptions]) -> Tensor:
        """Run in ``mode="hidden"`` or ``mode="logits"`` and return what the runtime computed.

        Hidden states come with one row per input token; logits with the last
        position's row. The tensor's ``stats`` are the run's perf stats.

        Raises:
            InvalidParameterError: bad arguments, or ``mode`` missing / ``"generate"``.
            RunError: the run failed or returned no buffer.
        """
        req = self._tensor_request(prompt, options)
        stream = RunStream(lambda: self._start(req), self._state.abort_run)
        with stream:
            for _chunk in stream:
                pass
        return self._tensor_of(stream.run)

    async def ainfer(self, prompt: str | None = None, **options: Unpack[RunOptions]) -> Tensor:
        """Async :meth:`infer`: waits without a thread; cancelling aborts the run."""
        run = self._start(self._tensor_request(prompt, options))
        async for _chunk in astream_run(run, self._state.abort_soon):
            pass
        return self._tensor_of(run)

    def _tensor_request(self, prompt: str | None, options: RunOptions) -> RunRequest:
        if options.get("mode", "generate") == "generate":
            raise InvalidParameterError('infer() needs mode="hidden" or mode="logits"')
        return self._state.request(prompt, **options)

    def _tensor_of(self, run: Run | None) -> Tensor:
        tensor = run.tensor if run is not None else None
        if tensor is None:
            raise RunError(f"{self._state.name}: the runtime returned no hidden states or logits", function="rkllm_run")
        return replace(tensor, stats=run.stats) if run is not None else tensor

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Await ``fn(*args)`` on the core's executor as part of this session.

        For short native calls from async code. If the caller is cancelled the
        call still finishes on its thread, and the handle is not let go before it has.
        """
        state = self._state
        if not self.active:
            raise InvalidParameterError("the session is not active")
        with state.mutex:
            state.jobs += 1
        try:
            future = submit(fn, *args)
        except BaseException:
            state.job_ended()
            raise
        future.add_done_callback(lambda _f: state.job_ended())
        return await asyncio.shield(asyncio.wrap_future(future))  # a cancel must not stop a native call

    # -- native calls -----------------------------------------------------------------------------------
    def clear_kv_cache(self, keep_system_prompt: bool = False) -> None:
        """Empty the KV cache (optionally keeping the system prompt)."""
        state = self._ready()
        rc = state.backend.clear_kv_cache(state.handle, keep_system_prompt)
        self._moved(0 if rc == 0 and not keep_system_prompt else None)
        self._check(rc, "rkllm_clear_kv_cache")

    def kv_cache_size(self) -> int:
        """The number of positions in the KV cache (of the first batch); also recorded in :attr:`kv`."""
        state = self._ready()
        rc, size = state.backend.kv_cache_size(state.handle, state.n_batch)
        self._check(rc, "rkllm_get_kv_cache_size")
        state.kv = KVState(state.kv.epoch, state.kv.tag, size)
        return size

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """Replace the model's chat template with literal strings (you supply special tokens)."""
        args = (
            _c_text(system_prompt, "system_prompt"),
            _c_text(prompt_prefix, "prompt_prefix"),
            _c_text(prompt_postfix, "prompt_postfix"),
        )
        state = self._ready()
        state.chat_setup = None
        self._moved(None)
        self._check(state.backend.set_chat_template(state.handle, *args), "rkllm_set_chat_template")
        state.chat_setup = ChatTemplate(system_prompt, prompt_prefix, prompt_postfix)

    def set_function_tools(
        self, system_prompt: str, tools: str | Sequence[dict[str, Any]], tool_response_str: str = "tool_response"
    ) -> None:
        """Install a system prompt and OpenAI-style tool definitions (a JSON array)."""
        tools_json = _tools_json(tools)
        args = (
            _c_text(system_prompt, "system_prompt"),
            _c_text(tools_json, "tools"),
            _c_text(tool_response_str, "tool_response_str"),
        )
        state = self._ready()
        state.chat_setup = None
        self._moved(None)
        self._check(state.backend.set_function_tools(state.handle, *args), "rkllm_set_function_tools")
        state.chat_setup = FunctionTools(system_prompt, tools_json, tool_response_str)

    def load_prompt_cache(self, path: str | os.PathLike[str]) -> None:
        """Load a prompt cache file saved by an earlier run (``save_prompt_cache=``)."""
        raw = _c_path(path, "prompt cache path")
        if not Path(path).is_file():
            raise InvalidParameterError(f"prompt cache file not found: {path}")
        state = self._ready()
        state.prompt_cache = None
        self._moved(None)
        self._check(state.backend.load_prompt_cache(state.handle, raw), "rkllm_load_prompt_cache")
        state.prompt_cache = os.fspath(path)

    def release_prompt_cache(self) -> None:
        """Unload the loaded prompt cache."""
        state = self._ready()
        self._moved(None)
        rc = state.backend.release_prompt_cache(state.handle)
        state.prompt_cache = None
        self._check(rc, "rkllm_release_prompt_cache")

    def load_lora(self, path: str | os.PathLike[str], name: str, scale: float = 1.0) -> None:
        """Load a LoRA adapter; apply it to a run with ``lora=name``."""
        raw = _c_path(path, "LoRA path")
        if not Path(path).is_file():
            raise InvalidParameterError(f"LoRA adapter file not found: {path}")
        name_b = _c_text(name, "LoRA name")
        state = self._ready()
        self._check(state.backend.load_lora(state.handle, raw, name_b, scale), "rkllm_load_lora")


class RKLLMRuntime:
    """One model loaded into the runtime.

    Args:
        model_path: the ``.rkllm`` file.
        params: init settings on top of ``rkllm_createDefaultParam()``.
        library: a :class:`~rkllm_core.native.library.RuntimeLibrary`, or a path to
            the runtime (default: ``RKLLM_LIB_PATH``, then the usual places).
        abi: force the ABI ("1.2" or "1.3"); default ``RKLLM_ABI`` or detection.
        preflight: check memory and the NPU driver before ``rkllm_init`` (see
            :mod:`rkllm_core.preflight`); default: for a real runtime, not the simulator.

    Raises:
        ModelFileError: the model file does not exist.
        PreflightError: loading would crash the runtime (too little memory, the wrong NPU driver).
        InitError: ``rkllm_init`` failed.
        LibraryNotFoundError, ABIError: see :func:`~rkllm_core.native.library.load_library`.

    Example:
        >>> with RKLLMRuntime("qwen3.rkllm") as rt:  # doctest: +SKIP
        ...     for chunk in rt.stream("Hello"):
        ...         print(chunk.text, end="")
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        params: InitParams | None = None,
        library: RuntimeLibrary | str | os.PathLike[str] | None = None,
        abi: str | None = None,
        preflight: bool | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.params = self._with_context_limit(params or InitParams())
        if not self.model_path.is_file():
            raise ModelFileError(f"model file not found: {self.model_path}")
        self.library = library if isinstance(library, RuntimeLibrary) else load_library(library, abi)
        backend = self.library.backend
        param = backend.default_param()
        path_bytes = os.fsencode(self.model_path)
        param.model_path = path_bytes
        backend.apply_init(param, self.params)
        self.max_new_tokens = int(param.max_new_tokens)
        self.max_context_len = int(param.max_context_len)
        defaults = backend.sampling_defaults(param)
        base_sampling = SamplingParams(
            **{k: v if v is not None else defaults[k] for k, v in self.params.sampling.as_dict().items()}
        )
        if preflight if preflight is not None else not self.library.is_simulator:
            findings = preflight_checks.check(self.model_path, self.library.version)
            for finding in findings:
                if finding.status == "warning":
                    logger.warning("%s: %s", finding.check, finding.detail)
            preflight_checks.enforce(findings)
        rc, handle, keep = backend.init(param)
        if rc != 0 or not handle:
            raise InitError(
                f"rkllm_init failed for {self.model_path} (code {rc}); check the model file, that "
                f"max_context_len={self.max_context_len} is within the model's limit, the NPU driver "
                "version and /dev permissions (the runtime's own log above has details)",
                code=rc,
                function="rkllm_init",
            )
        try:
            self._state = _HandleState(
                backend,
                handle,
                (*keep, path_bytes),
                self.model_path.name,
                max_new_tokens=self.max_new_tokens,
                n_batch=self.params.n_batch or 1,
                base_sampling=base_sampling,
                image_tags=self.params.image_tags,
            )
            self._finalizer = weakref.finalize(self, _finalize, self._state)
            _live.add(self._state)
        except BaseException:  # e.g. Ctrl-C right after rkllm_init: never lose the handle it made
            if getattr(self, "_finalizer", None) is None:
                backend.destroy(handle)
            raise
        logger.info("loaded %s (ABI %s)", self.model_path.name, backend.abi)

    def _with_context_limit(self, params: InitParams) -> InitParams:
        """Default ``max_context_len`` to the limit the file name states, and refuse more (before init)."""
        limit = parse_model_filename(self.model_path.name).ctx
        wanted = context_len(params.max_context_len, limit, self.model_path.name, "from its file name")
        return params if wanted == params.max_context_len else replace(params, max_context_len=wanted)

    # -- state ------------------------------------------------------------------------------------
    @property
    def abi(self) -> str:
        """The runtime ABI in use ("1.2" or "1.3")."""
        return self.library.abi

    @property
    def per_run_sampling(self) -> bool:
        """True when sampling and ``max_new_tokens`` can change per run (the 1.3 ABI)."""
        return self.library.backend.per_run_sampling

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._state.closed

    @property
    def is_running(self) -> bool:
        """True while a run is generating on this handle."""
        return self._state.current is not None

    @property
    def kv(self) -> KVState:
        """What the KV cache holds (see :class:`KVState`); read it inside a session to rely on it."""
        return self._state.kv

    def close(self, timeout: float = ABORT_WAIT_S) -> None:
        """Abort any run and destroy the handle once nobody is using it. Safe to call twice.

        Waits up to ``timeout`` seconds for another caller to let go; a handle the
        calling thread or task holds itself is destroyed when it lets go.
        """
        if self._state.close(wait=timeout):
            self._finalizer.detach()

    def __enter__(self) -> RKLLMRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def abort(self) -> bool:
        """Abort the current run, if any. Returns True if a run was aborted. Does not wait."""
        return self._state.abort_current()

    @property
    def destroyed(self) -> bool:
        """True once the native handle is destroyed (its memory is free)."""
        return self._state.destroyed_event.is_set()

    def when_destroyed(self, fn: Callable[[], None]) -> bool:
        """Call ``fn`` (from whichever thread destroys the handle) once it is destroyed.

        Returns True, without calling ``fn``, if the handle is destroyed already.
        """
        return self._state.when_destroyed(fn)

    def reserve(self, owner: Hashable) -> Reservation | None:
        """Book the handle's next turn for ``owner`` (``None`` once closed).

        The model manager books it when it grants a lease, so the requests it serves
        use the handle in the order it served them. The booking is claimed by the
        next session of the call chain that holds it (:func:`~rkllm_core._sync.hold`),
        and must be cancelled if it is never used.
        """
        if self._state.closed:
            return None
        return self._state.lock.reserve(owner, release=self._state.unlock)

    def check_images(self, n_images: int, *, multi_image_abi12: bool = True, family: str = "") -> None:
        """Refuse a prompt's images before anything runs where this runtime and family cannot take them.

        Args:
            n_images: images in the prompt.
            multi_image_abi12: the family's ``VisionFamily.multi_image_abi12``.
            family: the family's name, for the message.

        Raises:
            ImageError: several images for a family that takes one per prompt on the 1.2 runtime.
        """
        check_image_count(self.abi, n_images, multi_image_abi12=multi_image_abi12, family=family)

    def session(self, timeout: float | None = None) -> Session:
        """Exclusive use of this handle: ``with rt.session() as s`` or ``async with rt.session() as s``.

        Args:
            timeout: seconds to wait in line before ``BusyError``.
        """
        return Session(self, timeout)

    # -- runs --------------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RunOptions],
    ) -> RunStream:
        """Start a generation and return its chunk stream.

        The handle is taken (in arrival order) at the first ``next()`` and handed
        on as soon as the runtime returns.

        Args:
            prompt: the text (the runtime applies the model's chat template).
            timeout: seconds to wait for the handle before raising ``BusyError``.
            **options: see :class:`RunOptions` (``role``, ``enable_thinking``,
                ``keep_history``, ``sampling``, ``max_new_tokens``, ``lora``,
                ``save_prompt_cache``, ``token_ids``, ``mode``; for images ``images``,
                ``image_size``, ``image_tags``, ``image_digests``, ``multi_image_abi12``).

        Raises:
            InvalidParameterError: bad arguments (nothing reaches the runtime); an
                :class:`~rkllm_core.errors.ImageError` for images that do not fit the prompt.
            HandleClosedError: the handle was closed.
        """
        req = self._state.request(prompt, **options)

        def start() -> Run:
            session = Session(self, timeout).acquire()
            try:
                return session._start(req)
            finally:
                session.release()  # takes effect when the run ends

        return RunStream(start, self._state.abort_run)

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[RunOptions]
    ) -> Completion:
        """Run to the end and return the whole text (same arguments as :meth:`stream`)."""
        return _collect(self.stream(prompt, timeout=timeout, **options))

    async def astream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncIterator[StreamChunk]:
        """Async version of :meth:`stream`; never blocks the event loop.

        Waiting for the handle occupies no thread. Cancelling the consuming task,
        or closing the generator early (use ``contextlib.aclosing``), aborts the
        run on the NPU.
        """
        req = self._state.request(prompt, **options)
        session = await Session(self, timeout).acquire_async()
        try:
            run = session._start(req)
        finally:
            session.release()  # takes effect when the run ends
        async for chunk in astream_run(run, self._state.abort_soon):
            yield chunk

    def batch(
        self,
        prompts: Sequence[str | BatchInput],
        *,
        timeout: float | None = None,
        filler: str = FILLER_PROMPT,
        **options: Unpack[BatchOptions],
    ) -> BatchRun:
        """Decode several prompts together in one batched run (a handle made with ``InitParams(n_batch=N)``).

        Waits in line for the handle (like :meth:`stream`), starts the run and returns at
        once; the handle is handed on when the runtime returns. Each prompt gets a stream
        of its own (:attr:`BatchRun.slots`); see :mod:`rkllm_core.runtime.batch` for the
        contract (``keep_history`` is 0, the filler policy, detaching).

        Args:
            prompts: 1 to ``n_batch`` prompts (``str`` or :class:`~rkllm_core.runtime.batch.BatchInput`).
            timeout: seconds to wait for the handle before raising ``BusyError``.
            filler: the prompt of the slots no prompt needs (its output is dropped).
            **options: shared by every slot: ``sampling`` (1.3), ``max_new_tokens``, ``lora``.

        Raises:
            InvalidParameterError: bad arguments (nothing reaches the runtime).
            HandleClosedError: the handle was closed.
        """
        reqs = plan_batch(self._state.request, prompts, self._state.n_batch, filler, options)
        session = Session(self, timeout).acquire()
        try:
            return session._start_batch(reqs, len(prompts))
        finally:
            session.release()  # takes effect when the run ends

    async def abatch(
        self,
        prompts: Sequence[str | BatchInput],
        *,
        timeout: float | None = None,
        filler: str = FILLER_PROMPT,
        **options: Unpack[BatchOptions],
    ) -> BatchRun:
        """Async :meth:`batch`: waits for the handle without a thread; cancelling leaves the line at once."""
        reqs = plan_batch(self._state.request, prompts, self._state.n_batch, filler, options)
        session = await Session(self, timeout).acquire_async()
        try:
            return session._start_batch(reqs, len(prompts))
        finally:
            session.release()

    # -- other native calls (each in a session of its own) -----------------------------------------
    def clear_kv_cache(self, keep_system_prompt: bool = False, *, timeout: float | None = None) -> None:
        """Empty the KV cache (optionally keeping the system prompt)."""
        with self.session(timeout) as s:
            s.clear_kv_cache(keep_system_prompt)

    def kv_cache_size(self, *, timeout: float | None = None) -> int:
        """Return the number of positions in the KV cache (of the first batch)."""
        with self.session(timeout) as s:
            return s.kv_cache_size()

    def set_chat_template(
        self, system_prompt: str, prompt_prefix: str, prompt_postfix: str, *, timeout: float | None = None
    ) -> None:
        """Replace the model's chat template with literal strings (you supply special tokens)."""
        with self.session(timeout) as s:
            s.set_chat_template(system_prompt, prompt_prefix, prompt_postfix)

    def set_function_tools(
        self,
        system_prompt: str,
        tools: str | Sequence[dict[str, Any]],
        tool_response_str: str = "tool_response",
        *,
        timeout: float | None = None,
    ) -> None:
        """Install a system prompt and OpenAI-style tool definitions (a JSON array)."""
        with self.session(timeout) as s:
            s.set_function_tools(system_prompt, tools, tool_response_str)

    def load_prompt_cache(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> None:
        """Load a prompt cache file saved by an earlier run (``save_prompt_cache=``)."""
        with self.session(timeout) as s:
            s.load_prompt_cache(path)

    def release_prompt_cache(self, *, timeout: float | None = None) -> None:
        """Unload the loaded prompt cache."""
        with self.session(timeout) as s:
            s.release_prompt_cache()

    def load_lora(
        self, path: str | os.PathLike[str], name: str, scale: float = 1.0, *, timeout: float | None = None
    ) -> None:
        """Load a LoRA adapter; apply it to a run with ``lora=name``."""
        with self.session(timeout) as s:
            s.load_lora(path, name, scale)


def _images_after(kv: KVState, req: RunRequest) -> tuple[str, ...]:
    """The images the cache holds after ``req``: a declared history's, then the run's own (if it keeps its turn)."""
    if not req.keep_history:
        return ()
    own = req.multimodal.digests if req.multimodal is not None else ()
    return (kv.images if kv.tag is not None else ()) + own


def _run_limit(init_limit: int, req: RunRequest) -> int:
    """The token limit a run's finish reason is judged by: the request's, the binding's own cut, else the init value."""
    limit = init_limit
    if req.max_new_tokens is not None and req.max_new_tokens > 0:
        limit = req.max_new_tokens
    if req.stop_after:
        limit = req.stop_after if limit <= 0 else min(limit, req.stop_after)
    return limit


def _collect(stream: RunStream) -> Completion:
    with stream as s:
        final = None
        for chunk in s:
            final = chunk
        assert final is not None and final.finish_reason is not None
        return Completion(s.text, final.finish_reason, final.stats, s.tokens)


def _tools_json(tools: str | Sequence[dict[str, Any]]) -> str:
    if not isinstance(tools, str):
        try:
            return json.dumps(list(tools), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError(f"tools are not JSON-serialisable: {exc}") from exc
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(f"tools is not valid JSON: {exc}") from exc
    if not isinstance(parsed, list):
        raise InvalidParameterError("tools must be a JSON array")
    return tools
