"""A crash-safe on-disk store for the runtime's prompt (KV) cache files.

The runtime can save the KV state after a run's prefill to a file (a run with
``save_prompt_cache=<path>``) and load it later (``load_prompt_cache(path)``)
so a run whose input starts with the same prefix skips that prefill. The
runtime reads and writes those files itself; this module decides where they
live, checks that a file belongs to the prompt it is about to be used for,
commits new files atomically, locks them against concurrent replacement and
evicts old ones.

Typical use (the chat engine)::

    store = PromptCacheStore()
    key = store.make_key(model_path, system=system_prompt, template=template, runtime="1.3.0")
    with store.reading(key) as path:          # shared lock while the runtime loads
        if path is not None and not runtime_loaded(path):
            store.invalidate(key, "the runtime could not load it")
            path = None
    if path is None:
        staged = store.staging_path(key)
        ...run with save_prompt_cache=staged...
        store.commit(key, staged)

Layout of the store directory (one *entry* per key; ``<digest>`` is the key's
64-hex-digit SHA-256):

* ``<digest>.cache``: the runtime's cache file, only ever put in place by
  ``os.replace`` of a complete staged file, so it is never half-written;
* ``<digest>.json``: the metadata sidecar (format, digest, model identity,
  fields, size, created, extra), written to a temporary file and renamed into
  place. Its mtime is the entry's *last used* time (LRU order that survives
  restarts); it is touched on every hit;
* ``<digest>.lock``: an empty file for ``fcntl.flock``. Readers
  (:meth:`PromptCacheStore.reading`, :meth:`PromptCacheStore.lookup`) hold a
  shared lock; commit, invalidation and eviction hold an exclusive one. A lock
  file is only unlinked by a holder of its exclusive lock, and every
  acquisition checks that the file it locked is still the one at the path, so
  a removed entry can never be "locked" through a stale lock file;
* ``<digest>.<pid>.<random>.tmp`` and ``<digest>.<pid>.<random>.json.tmp``:
  staging files for the runtime and for sidecars; :meth:`~PromptCacheStore.evict`
  deletes those older than an hour (left over by crashed processes).

An entry is valid when its sidecar parses, names its own digest, hashes back to
that digest from its model identity and fields, and records the data file's
exact size. A commit first deletes the old sidecar, then renames the data file
into place, then writes the new sidecar, so a crash at any point leaves either
the old valid entry, or a data file without sidecar (invalid: removed with a
warning on the next lookup). Lookups never raise for corrupt or foreign files;
they remove them and report a miss.

Locks are taken with a timeout (``lock_timeout``): a reader that cannot get its
shared lock reports a miss, a commit that cannot get its exclusive lock drops
its staged file. A thread may call :meth:`~PromptCacheStore.invalidate`,
:meth:`~PromptCacheStore.commit` or :meth:`~PromptCacheStore.clear` for a key
it is currently reading: its shared lock is converted to an exclusive one
(``flock`` converts non-atomically, so another process may act on the entry in
between) and back afterwards. :meth:`~PromptCacheStore.evict` skips every
entry that any reader holds, including the calling thread.

The store directory (see :func:`default_cache_dir`) is created on first write
with mode 0700: sidecars hold the key's fields, which may include the system
prompt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from ..errors import CacheError, InvalidParameterError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "ENV_PROMPT_CACHE_DIR",
    "FORMAT_VERSION",
    "STALE_TMP_SECONDS",
    "CacheEntryInfo",
    "CacheKey",
    "PromptCacheStore",
    "default_cache_dir",
    "model_identity",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the store directory.
ENV_PROMPT_CACHE_DIR: Final = "RKLLM_PROMPT_CACHE_DIR"
#: Version of the key scheme and of the sidecar format.
FORMAT_VERSION: Final = 1
#: Default byte budget of a store (data files only).
DEFAULT_MAX_BYTES: Final = 2 * 1024**3
#: Default entry budget of a store.
DEFAULT_MAX_ENTRIES: Final = 64
#: Staging files older than this (by mtime) are deleted by eviction.
STALE_TMP_SECONDS: Final = 3600.0

_SCHEME: Final = "rkllm-core/prompt-cache"
_DATA_SUFFIX: Final = ".cache"
_META_SUFFIX: Final = ".json"
_LOCK_SUFFIX: Final = ".lock"
_MAX_META_BYTES: Final = 16 * 1024 * 1024
_DEFAULT_LOCK_TIMEOUT: Final = 30.0
_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")
_ENTRY_FILE_RE: Final = re.compile(r"([0-9a-f]{64})\.(cache|json|lock)")
_TMP_FILE_RE: Final = re.compile(r"[0-9a-f]{64}\.[0-9]+\.[0-9a-f]+(?:\.json)?\.tmp")

_Kind = Literal["cache", "json", "lock"]


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------


def model_identity(path: str | os.PathLike[str]) -> str:
    """Identify a model file by its resolved path, size and modification time.

    Rewriting, replacing or touching the file changes its identity, and with it
    every :class:`CacheKey` made for it.

    Args:
        path: the model file.

    Returns:
        ``"<resolved path>|<size>|<mtime_ns>"``.

    Raises:
        CacheError: the file does not exist, cannot be examined or is not a
            regular file.
    """
    name = os.fspath(path)
    try:
        resolved = os.path.realpath(name, strict=True)
        st = os.stat(resolved)
    except OSError as exc:
        raise CacheError(f"cannot identify model file {name!r}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"cannot identify model file {name!r}: not a regular file")
    return f"{resolved}|{st.st_size}|{st.st_mtime_ns}"


def _identity_path(identity: str) -> str:
    """The resolved path part of a :func:`model_identity` string."""
    return identity.rsplit("|", 2)[0]


def _compute_digest(model: str, fields: Mapping[str, str]) -> str:
    """SHA-256 over a canonical JSON form of the model identity and sorted fields."""
    payload = json.dumps(
        {"scheme": _SCHEME, "format": FORMAT_VERSION, "model": model, "fields": dict(sorted(fields.items()))},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,  # also escapes lone surrogates from undecodable paths
    )
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a cache file was made for: a model file and the prompt parts before the user turn.

    Build keys with :meth:`PromptCacheStore.make_key`. Construction checks that
    ``digest`` is the digest of ``model`` and ``fields``, so a key is always
    self-consistent. Keys compare and hash by digest and model.

    Attributes:
        digest: hex SHA-256 over the model identity and the sorted fields;
            the same in every process.
        model: the model file's :func:`model_identity`.
        fields: what else went into the digest (system prompt, tools, chat
            template, ABI and runtime versions, ...), sorted by name, read-only.
    """

    digest: str
    model: str
    fields: Mapping[str, str] = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise InvalidParameterError(f"CacheKey.model must be a str, not {type(self.model).__name__}")
        ordered = dict(sorted(_checked_fields(self.fields).items()))
        object.__setattr__(self, "fields", MappingProxyType(ordered))
        if not isinstance(self.digest, str) or self.digest != _compute_digest(self.model, ordered):
            raise InvalidParameterError(
                "CacheKey.digest is not the digest of its model and fields; build keys with PromptCacheStore.make_key()"
            )

    def __reduce__(self) -> tuple[Any, ...]:  # mappingproxy does not pickle
        return (CacheKey, (self.digest, self.model, dict(self.fields)))


def _checked_fields(fields: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(fields, Mapping):
        raise InvalidParameterError(f"cache key fields must be a mapping, not {type(fields).__name__}")
    out: dict[str, str] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidParameterError(f"cache key fields must map str to str; {name!r} is {type(value).__name__}")
        out[name] = value
    return out


@dataclass(frozen=True, slots=True)
class CacheEntryInfo:
    """One valid entry of a :class:`PromptCacheStore`, as listed by :meth:`~PromptCacheStore.entries`.

    Attributes:
        digest: the key's digest (also the file name stem).
        path: the cache data file.
        size: the data file's size in bytes.
        last_used: when the entry was last committed or looked up (seconds
            since the epoch).
        fields: the key's fields.
        model: the key's model identity.
        created: when the entry was committed (seconds since the epoch).
        extra: the ``extra`` mapping given to :meth:`~PromptCacheStore.commit`.
    """

    digest: str
    path: Path
    size: int
    last_used: float
    fields: Mapping[str, str] = field(compare=False, repr=False)
    model: str
    created: float
    extra: Mapping[str, object] = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def __reduce__(self) -> tuple[Any, ...]:  # mappingproxy does not pickle
        return (
            CacheEntryInfo,
            (
                self.digest,
                self.path,
                self.size,
                self.last_used,
                dict(self.fields),
                self.model,
                self.created,
                dict(self.extra),
            ),
        )


@dataclass(frozen=True, slots=True)
class _Meta:
    """A parsed, self-consistent sidecar."""

    digest: str
    model: str
    fields: dict[str, str]
    size: int
    created: float
    extra: dict[str, object]
    last_used_ns: int


def _parse_meta(raw: bytes, digest: str, mtime_ns: int) -> _Meta | str:
    """Parse a sidecar; returns the reason it is invalid instead of raising."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "metadata is not valid JSON"
    if not isinstance(obj, dict):
        return "metadata is not a JSON object"
    if obj.get("format") != FORMAT_VERSION:
        return f"metadata format {obj.get('format')!r} is not {FORMAT_VERSION}"
    if obj.get("digest") != digest:
        return "metadata belongs to another key"
    model = obj.get("model")
    fields = obj.get("fields")
    if not isinstance(model, str) or not isinstance(fields, dict):
        return "metadata has no model identity or fields"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        return "metadata fields are not all strings"
    if _compute_digest(model, fields) != digest:
        return "metadata does not hash to its digest"
    size = obj.get("size")
    if type(size) is not int or size <= 0:
        return "metadata has no valid size"
    created = obj.get("created")
    if isinstance(created, bool) or not isinstance(created, int | float):
        return "metadata has no valid creation time"
    extra = obj.get("extra")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        return "metadata extra is not an object"
    return _Meta(digest, model, fields, size, float(created), extra, mtime_ns)


# --------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _HeldLock:
    fd: int
    exclusive: bool


class _ThreadLocks(threading.local):
    """The entry locks the current thread holds, by lock file path."""

    def __init__(self) -> None:
        self.held: dict[str, _HeldLock] = {}


_THREAD_LOCKS = _ThreadLocks()


def _flock(fd: int, operation: int, timeout: float | None) -> bool:
    """``flock`` with a timeout (None: wait forever; 0: one attempt). Returns whether it was taken."""
    try:
        if timeout is None:
            fcntl.flock(fd, operation)
            return True
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.005)
    except OSError as exc:
        raise CacheError(f"cannot lock a prompt cache entry: {exc.strerror or exc}") from exc


def _is_current(fd: int, path: str) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not unlinked or replaced)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CacheError(f"cannot examine lock file {path!r}: {exc.strerror or exc}") from exc
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)


def _open_locked(path: str, exclusive: bool, timeout: float | None) -> int | None:
    """Open (creating) and lock the lock file at ``path``; None on timeout."""
    operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot open lock file {path!r}: {exc.strerror or exc}") from exc
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _flock(fd, operation, remaining):
                os.close(fd)
                return None
            if _is_current(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        # The entry was removed (and its lock file unlinked) while we waited: lock the new file.
        os.close(fd)


def _held_by_this_thread(path: Path) -> bool:
    return os.fspath(path) in _THREAD_LOCKS.held


@contextmanager
def _entry_lock(path: Path, *, exclusive: bool, timeout: float | None) -> Iterator[bool]:
    """Hold an entry's lock; yields False when it could not be taken within ``timeout``.

    Re-entrant per thread: a lock this thread already holds is reused, and a
    shared one is converted to exclusive for the duration (and back).
    """
    key = os.fspath(path)
    table = _THREAD_LOCKS.held
    outer = table.get(key)
    if outer is not None and _is_current(outer.fd, key):
        if outer.exclusive or not exclusive:
            yield True
            return
        # Conversion drops the shared lock first; on failure, take it back.
        if not _flock(outer.fd, fcntl.LOCK_EX, timeout):
            _flock(outer.fd, fcntl.LOCK_SH, None)
            yield False
            return
        if _is_current(outer.fd, key):
            outer.exclusive = True
            try:
                yield True
            finally:
                outer.exclusive = False
                _flock(outer.fd, fcntl.LOCK_SH, None)
            return
        # Someone removed the entry during the conversion: lock its new lock file below.
        _flock(outer.fd, fcntl.LOCK_SH, None)
    fd = _open_locked(key, exclusive, timeout)
    if fd is None:
        yield False
        return
    table[key] = _HeldLock(fd, exclusive)
    try:
        yield True
    finally:
        if outer is None:
            table.pop(key, None)
        else:
            table[key] = outer
        os.close(fd)


# --------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------


def _unlink_quiet(path: str | os.PathLike[str]) -> bool:
    """Unlink; True when a file was removed. Errors other than "missing" are logged."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not remove %s: %s", os.fspath(path), exc.strerror or exc)
        return False


def _fsync_file(path: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(extra: Mapping[str, object] | None) -> dict[str, object]:
    """``extra`` as it will read back from the sidecar; values JSON cannot hold become strings."""
    if extra is None:
        return {}
    try:
        loaded = json.loads(json.dumps(dict(extra), default=str, ensure_ascii=True))
    except (TypeError, ValueError, RecursionError) as exc:  # non-str keys, cycles
        logger.warning("prompt cache extra metadata is not JSON-able (%s); storing its repr", exc)
        return {"repr": repr(extra)}
    if not isinstance(loaded, dict):
        return {"repr": repr(extra)}
    return loaded


def default_cache_dir() -> Path:
    """The default store directory.

    ``$RKLLM_PROMPT_CACHE_DIR`` if set and not empty, else
    ``$XDG_CACHE_HOME/rkllm-core/prompt-cache`` (when ``XDG_CACHE_HOME`` is an
    absolute path, as the XDG spec requires), else
    ``~/.cache/rkllm-core/prompt-cache``.

    Returns:
        An absolute path (not created).
    """
    env = os.environ.get(ENV_PROMPT_CACHE_DIR)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return (base / "rkllm-core" / "prompt-cache").absolute()


def _short(digest: str) -> str:
    return digest[:12]


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


class PromptCacheStore:
    """A directory of prompt cache files keyed by :class:`CacheKey`, safe across threads and processes.

    See the module documentation for the layout and the locking protocol. All
    methods may be called from any thread; several stores (in one process or
    several) may share a directory.

    Attributes:
        directory: the store directory (absolute; created on first write).
        max_bytes: budget for the total size of the data files.
        max_entries: budget for the number of entries.
        lock_timeout: seconds to wait for an entry lock (None: forever).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        lock_timeout: float | None = _DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        """Create a store; nothing is touched on disk until the first write.

        Args:
            directory: the store directory; default :func:`default_cache_dir`.
            max_bytes: eviction keeps the data files' total size at or below
                this; a staged file larger than this is not committed.
            max_entries: eviction keeps at most this many entries.
            lock_timeout: seconds to wait for an entry's lock before giving up
                (a miss for readers, a dropped commit for writers); None waits
                forever.

        Raises:
            InvalidParameterError: a budget is negative or not an int, or the
                timeout is negative.
        """
        for name, value in (("max_bytes", max_bytes), ("max_entries", max_entries)):
            if type(value) is not int or value < 0:
                raise InvalidParameterError(f"{name} must be an int >= 0, not {value!r}")
        if lock_timeout is not None and (
            isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float) or lock_timeout < 0
        ):
            raise InvalidParameterError(f"lock_timeout must be None or a number >= 0, not {lock_timeout!r}")
        self.directory: Path = default_cache_dir() if directory is None else Path(directory).expanduser().absolute()
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.lock_timeout: float | None = None if lock_timeout is None else float(lock_timeout)

    def __repr__(self) -> str:
        return f"PromptCacheStore({str(self.directory)!r}, max_bytes={self.max_bytes}, max_entries={self.max_entries})"

    # -- keys ---------------------------------------------------------------

    def make_key(self, model_path: str | os.PathLike[str], **fields: str) -> CacheKey:
        """Build the key for a model file and the prompt parts a cache file depends on.

        Pass everything that changes the KV state the runtime saves: system
        prompt, tools, chat template, ABI and runtime versions, etc.

        Args:
            model_path: the model file; its :func:`model_identity` goes into the key.
            **fields: str values, e.g. ``system="..."``, ``template="..."``,
                ``abi="1.3"``, ``runtime="1.3.0"``; order does not matter.

        Returns:
            The key; its digest is the same in every process.

        Raises:
            CacheError: the model file cannot be examined.
            InvalidParameterError: a field value is not a str.
        """
        checked = _checked_fields(fields)
        model = model_identity(model_path)
        return CacheKey(_compute_digest(model, checked), model, checked)

    # -- paths ----------------------------------------------------------------

    def _data_path(self, digest: str) -> Path:
        return self.directory / f"{digest}{_DATA_SUFFIX}"

    def _meta_path(self, digest: str) -> Path:
        return self.directory / f"{digest}{_META_SUFFIX}"

    def _lock_path(self, digest: str) -> Path:
        return self.directory / f"{digest}{_LOCK_SUFFIX}"

    def _tmp_path(self, digest: str, suffix: str = ".tmp") -> Path:
        return self.directory / f"{digest}.{os.getpid()}.{secrets.token_hex(8)}{suffix}"

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cannot create prompt cache directory {str(self.directory)!r}: {exc.strerror or exc}"
            ) from exc

    def _has_files(self, digest: str) -> bool:
        return os.path.lexists(self._meta_path(digest)) or os.path.lexists(self._data_path(digest))

    @staticmethod
    def _checked_key(key: CacheKey) -> str:
        if not isinstance(key, CacheKey):
            raise InvalidParameterError(f"expected a CacheKey, not {type(key).__name__}")
        if not _DIGEST_RE.fullmatch(key.digest):
            raise InvalidParameterError(f"malformed cache key digest {key.digest!r}")
        return key.digest

    # -- validation -------------------------------------------------------------

    def _read_meta(self, digest: str) -> _Meta | str | None:
        """The entry's parsed sidecar, the reason it is invalid, or None when it does not exist."""
        try:
            with open(self._meta_path(digest), "rb") as fh:
                mtime_ns = os.fstat(fh.fileno()).st_mtime_ns
                raw = fh.read(_MAX_META_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"metadata unreadable ({exc.strerror or exc})"
        if len(raw) > _MAX_META_BYTES:
            return "metadata file is too large"
        return _parse_meta(raw, digest, mtime_ns)

    def _inspect(self, digest: str) -> _Meta | str | None:
        """The entry's metadata if it is valid, the reason it is not, or None when it does not exist."""
        meta = self._read_meta(digest)
        try:
            st: os.stat_result | None = os.lstat(self._data_path(digest))
        except FileNotFoundError:
            st = None
        except OSError as exc:
            return f"data file unreadable ({exc.strerror or exc})"
        if meta is None and st is None:
            return None
        if meta is None:
            return "metadata file missing"
        if isinstance(meta, str):
            return meta
        if st is None:
            return "data file missing"
        if not stat.S_ISREG(st.st_mode):
            return "data file is not a regular file"
        if st.st_size != meta.size:
            return f"data file has {st.st_size} bytes, metadata says {meta.size}"
        return meta

    def _check(self, key: CacheKey) -> _Meta | str | None:
        state = self._inspect(key.digest)
        if isinstance(state, _Meta) and (state.model != key.model or state.fields != dict(key.fields)):
            return "metadata belongs to another key"
        return state

    def _touch(self, digest: str) -> None:
        now = time.time_ns()
        try:
            os.utime(self._meta_path(digest), ns=(now, now))
        except OSError as exc:
            logger.debug("could not mark prompt cache entry %s as used: %s", _short(digest), exc)

    def _remove_files(self, digest: str) -> None:
        """Remove an entry's files; the caller holds its exclusive lock (the lock file goes last)."""
        _unlink_quiet(self._meta_path(digest))
        _unlink_quiet(self._data_path(digest))
        _unlink_quiet(self._lock_path(digest))

    def _discard_invalid(self, key: CacheKey) -> None:
        """Remove the key's entry if, checked again under its exclusive lock, it is still invalid."""
        digest = key.digest
        with _entry_lock(self._lock_path(digest), exclusive=True, timeout=self.lock_timeout) as locked:
            if not locked:
                logger.warning("prompt cache entry %s is invalid but busy; leaving it for now", _short(digest))
                return
            state = self._check(key)
            if isinstance(state, str):
                logger.warning("prompt cache entry %s is invalid (%s); removing it", _short(digest), state)
                self._remove_files(digest)

    # -- reading ----------------------------------------------------------------

    def lookup(self, key: CacheKey) -> Path | None:
        """The committed cache file for ``key``, or None.

        An entry whose sidecar is missing, corrupt, of another key, or whose
        data file is missing or of the wrong size is removed with a logged
        warning and reported as a miss. A hit marks the entry as used (LRU).

        The file is not locked once this returns: a concurrent commit may
        replace it (atomically, so it is always a complete file) and eviction
        may delete it. Use :meth:`reading` to hold it while the runtime loads it.

        Args:
            key: the key from :meth:`make_key`.

        Returns:
            The data file's path, or None.

        Raises:
            CacheError: the lock file cannot be created or locked (not for
                corrupt entries).
        """
        with self.reading(key) as path:
            return path

    @contextmanager
    def reading(self, key: CacheKey) -> Iterator[Path | None]:
        """Like :meth:`lookup`, holding a shared lock on the entry for the ``with`` block.

        While the block runs no commit, invalidation or eviction (in any
        process) replaces or deletes the file, so the runtime can load it
        safely. The calling thread may still :meth:`invalidate` or
        :meth:`commit` the key inside the block (the lock is converted).
        Keep the block short: commits of the same key wait for it.

        Args:
            key: the key from :meth:`make_key`.

        Yields:
            The data file's path, or None on a miss (also when the shared lock
            could not be taken within ``lock_timeout``).

        Raises:
            CacheError: the lock file cannot be created or locked.
        """
        digest = self._checked_key(key)
        if not self._has_files(digest):
            yield None
            return
        lock = self._lock_path(digest)
        for _ in range(3):
            with _entry_lock(lock, exclusive=False, timeout=self.lock_timeout) as locked:
                if not locked:
                    logger.warning(
                        "prompt cache entry %s stayed locked for %s s; treating it as a miss",
                        _short(digest),
                        self.lock_timeout,
                    )
                    yield None
                    return
                state = self._check(key)
                if not isinstance(state, str):
                    if state is None:
                        yield None
                    else:
                        self._touch(digest)
                        yield self._data_path(digest)
                    return
            self._discard_invalid(key)
        yield None

    # -- writing ----------------------------------------------------------------

    def staging_path(self, key: CacheKey) -> Path:
        """A fresh path in the store directory for the runtime to save a cache file to.

        The file is not created; the directory is. Pass the path to
        :meth:`commit` afterwards (also when the run failed: commit cleans up).
        Abandoned staging files are deleted by :meth:`evict` after an hour.

        Args:
            key: the key the file will be committed under.

        Returns:
            ``<directory>/<digest>.<pid>.<random>.tmp``.

        Raises:
            CacheError: the directory cannot be created.
        """
        digest = self._checked_key(key)
        self._ensure_dir()
        return self._tmp_path(digest)

    def commit(
        self, key: CacheKey, staged: str | os.PathLike[str], *, extra: Mapping[str, object] | None = None
    ) -> Path | None:
        """Make a staged cache file the entry for ``key`` (replacing any previous one), then evict.

        The staged file is moved, not copied (copied then deleted when it is on
        another file system). Under the entry's exclusive lock the old sidecar
        is deleted, the file is renamed to its final name and the new sidecar
        is written atomically. Concurrent commits of one key serialise; the
        last one wins.

        Args:
            key: the key the file was made for.
            staged: the file the runtime wrote, normally from :meth:`staging_path`.
            extra: JSON-able details stored in the sidecar (values that are not
                JSON-able are stored as strings; a mapping JSON cannot hold at
                all, e.g. with tuple keys, as ``{"repr": repr(extra)}``).

        Returns:
            The committed data file, or None when nothing was committed: the
            staged file is missing, empty, not a regular file or larger than
            ``max_bytes``; the entry stayed locked past ``lock_timeout``; or
            eviction removed the new entry at once (``max_entries`` 0). Each
            case is logged as a warning and the staged file is deleted.

        Raises:
            CacheError: writing the entry failed (e.g. disk full); the staged
                file and any partial entry are removed first.
        """
        digest = self._checked_key(key)
        short = _short(digest)
        staged = Path(staged)
        try:
            st = os.stat(staged)
        except OSError as exc:
            logger.warning(
                "not committing prompt cache entry %s: staged file %s is missing (%s)",
                short,
                staged,
                exc.strerror or exc,
            )
            return None
        if not stat.S_ISREG(st.st_mode):
            logger.warning("not committing prompt cache entry %s: %s is not a regular file", short, staged)
            return None
        if st.st_size == 0:
            logger.warning("not committing prompt cache entry %s: staged file %s is empty", short, staged)
            _unlink_quiet(staged)
            return None
        if st.st_size > self.max_bytes:
            logger.warning(
                "not committing prompt cache entry %s: %d bytes exceed the store's max_bytes %d",
                short,
                st.st_size,
                self.max_bytes,
            )
            _unlink_quiet(staged)
            return None
        extra_doc = _jsonable(extra)
        self._ensure_dir()
        try:
            staged = self._into_directory(digest, staged, st)
        except OSError as exc:
            _unlink_quiet(staged)
            raise CacheError(f"cannot move staged prompt cache file into {str(self.directory)!r}: {exc}") from exc
        _fsync_file(staged)  # the data must be on disk before its final name is

        data = self._data_path(digest)
        size = 0
        with _entry_lock(self._lock_path(digest), exclusive=True, timeout=self.lock_timeout) as locked:
            if not locked:
                logger.warning(
                    "not committing prompt cache entry %s: it stayed locked for %s s", short, self.lock_timeout
                )
                _unlink_quiet(staged)
                return None
            try:
                # Old sidecar first: a crash after this leaves data without metadata, which is invalid.
                _unlink_quiet(self._meta_path(digest))
                os.replace(staged, data)
                size = os.stat(data).st_size
                self._write_meta(key, size, extra_doc)
                _fsync_dir(self.directory)
            except OSError as exc:
                _unlink_quiet(staged)
                self._remove_files(digest)
                raise CacheError(f"cannot commit prompt cache entry {short}: {exc.strerror or exc}") from exc
        logger.info("committed prompt cache entry %s (%d bytes)", short, size)
        try:
            self.evict()
        except CacheError as exc:
            logger.warning("prompt cache eviction failed: %s", exc)
        if not os.path.exists(data):
            logger.warning("prompt cache entry %s was evicted right after its commit", short)
            return None
        return data

    def _into_directory(self, digest: str, staged: Path, st: os.stat_result) -> Path:
        """The staged file, copied into the store directory first if it is on another file system."""
        if os.stat(self.directory).st_dev == st.st_dev:
            return staged
        local = self._tmp_path(digest)
        try:
            shutil.copyfile(staged, local)
        except BaseException:
            _unlink_quiet(local)
            raise
        _unlink_quiet(staged)
        return local

    def _write_meta(self, key: CacheKey, size: int, extra: dict[str, object]) -> None:
        """Write the sidecar atomically (temporary file, fsync, rename); its mtime is "now"."""
        doc = {
            "format": FORMAT_VERSION,
            "digest": key.digest,
            "model": key.model,
            "fields": dict(key.fields),
            "size": size,
            "created": time.time(),
            "extra": extra,
        }
        raw = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True, default=str).encode("ascii")
        tmp = self._tmp_path(key.digest, ".json.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            now = time.time_ns()
            os.utime(tmp, ns=(now, now))
            os.replace(tmp, self._meta_path(key.digest))
        except BaseException:
            _unlink_quiet(tmp)
            raise

    # -- removal ---------------------------------------------------------------

    def invalidate(self, key: CacheKey, reason: str) -> None:
        """Remove the key's entry, e.g. after the runtime failed to load it.

        Logged as a warning naming ``reason``. Waits up to ``lock_timeout`` for
        readers in other threads or processes; gives up with a warning after
        that. May be called inside :meth:`reading` for the same key.

        Args:
            key: the key whose entry to remove.
            reason: why, for the log.

        Raises:
            CacheError: the lock file cannot be created or locked.
        """
        digest = self._checked_key(key)
        if not self._has_files(digest):
            logger.debug("prompt cache entry %s: nothing to invalidate (%s)", _short(digest), reason)
            return
        with _entry_lock(self._lock_path(digest), exclusive=True, timeout=self.lock_timeout) as locked:
            if not locked:
                logger.warning(
                    "could not invalidate prompt cache entry %s (%s): it stayed locked for %s s",
                    _short(digest),
                    reason,
                    self.lock_timeout,
                )
                return
            logger.warning("invalidating prompt cache entry %s: %s", _short(digest), reason)
            self._remove_files(digest)

    def invalidate_model(self, model_path: str | os.PathLike[str]) -> int:
        """Remove the entries made for an earlier version of a model file.

        An entry is removed when its model identity names this file's resolved
        path but not its current size and mtime (every entry of that path when
        the file no longer exists). Entries of the current file and of other
        files are kept.

        Args:
            model_path: the model file.

        Returns:
            How many entries were removed.

        Raises:
            CacheError: the directory cannot be listed or a lock file cannot be
                created or locked.
        """
        resolved = os.path.realpath(os.fspath(model_path))
        try:
            current: str | None = model_identity(model_path)
        except CacheError:
            current = None

        def stale(meta: _Meta | str | None) -> bool:
            return isinstance(meta, _Meta) and _identity_path(meta.model) == resolved and meta.model != current

        removed = 0
        kinds, _ = self._scan()
        for digest in sorted(kinds):
            if "json" not in kinds[digest] or not stale(self._read_meta(digest)):
                continue
            with _entry_lock(self._lock_path(digest), exclusive=True, timeout=self.lock_timeout) as locked:
                if not locked:
                    logger.warning("prompt cache entry %s is for a changed model but busy; kept", _short(digest))
                    continue
                if stale(self._read_meta(digest)):
                    logger.info("removing prompt cache entry %s: model file %s changed", _short(digest), resolved)
                    self._remove_files(digest)
                    removed += 1
        return removed

    def _scan(self) -> tuple[dict[str, set[_Kind]], list[os.DirEntry[str]]]:
        """The directory's entry files by digest, and its staging files."""
        kinds: dict[str, set[_Kind]] = {}
        tmps: list[os.DirEntry[str]] = []
        try:
            it = os.scandir(self.directory)
        except FileNotFoundError:
            return kinds, tmps
        except OSError as exc:
            raise CacheError(f"cannot list prompt cache directory {str(self.directory)!r}: {exc}") from exc
        with it:
            for entry in it:
                m = _ENTRY_FILE_RE.fullmatch(entry.name)
                if m is not None:
                    kind: _Kind = "cache" if m[2] == "cache" else "json" if m[2] == "json" else "lock"
                    kinds.setdefault(m[1], set()).add(kind)
                elif _TMP_FILE_RE.fullmatch(entry.name):
                    tmps.append(entry)
        return kinds, tmps

    def _remove_stale_tmps(self, tmps: list[os.DirEntry[str]]) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in tmps:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_mtime < cutoff and _unlink_quiet(entry.path):
                logger.info("removed stale prompt cache staging file %s", entry.name)

    def _drop_orphan_lock(self, digest: str) -> None:
        lock = self._lock_path(digest)
        if _held_by_this_thread(lock):
            return
        with _entry_lock(lock, exclusive=True, timeout=0.0) as locked:
            if locked and not self._has_files(digest):
                _unlink_quiet(lock)

    def _try_remove(self, digest: str, last_used_ns: int | None) -> Literal["removed", "busy", "gone", "kept"]:
        """Remove an entry if its lock is free right now.

        With ``last_used_ns``, a valid entry is removed only if it was not used
        or replaced since it was listed; without, only an invalid entry is removed.
        """
        lock = self._lock_path(digest)
        if _held_by_this_thread(lock):
            return "busy"
        with _entry_lock(lock, exclusive=True, timeout=0.0) as locked:
            if not locked:
                return "busy"
            state = self._inspect(digest)
            if state is None:
                _unlink_quiet(lock)
                return "gone"
            if isinstance(state, str):
                logger.warning("prompt cache entry %s is invalid (%s); removing it", _short(digest), state)
            elif last_used_ns is None or state.last_used_ns != last_used_ns:
                return "kept"
            self._remove_files(digest)
            return "removed"

    def evict(self) -> int:
        """Drop least recently used entries until the store is within its budgets.

        Entries are removed oldest "last used" first until the data files'
        total size is at most ``max_bytes`` and there are at most
        ``max_entries`` entries. Entries that a reader holds (any thread or
        process, this thread included) and entries used since the listing are
        skipped, so the budgets may stay exceeded until the next eviction.
        Invalid entries that are not locked are removed too (with a warning),
        as are lock files without an entry and staging files older than
        :data:`STALE_TMP_SECONDS`.

        Returns:
            How many entries were removed (invalid ones included; staging and
            lock files not counted).

        Raises:
            CacheError: the directory cannot be listed.
        """
        kinds, tmps = self._scan()
        self._remove_stale_tmps(tmps)
        removed = 0
        live: list[tuple[int, int, str]] = []
        for digest, present in kinds.items():
            if present == {"lock"}:
                self._drop_orphan_lock(digest)
                continue
            state = self._inspect(digest)
            if isinstance(state, _Meta):
                live.append((state.last_used_ns, state.size, digest))
            elif state is not None and self._try_remove(digest, None) == "removed":
                removed += 1
        live.sort()
        total = sum(size for _, size, _ in live)
        count = len(live)
        for last_used_ns, size, digest in live:
            if total <= self.max_bytes and count <= self.max_entries:
                break
            outcome = self._try_remove(digest, last_used_ns)
            if outcome == "busy":
                logger.debug("not evicting prompt cache entry %s: in use", _short(digest))
                continue
            if outcome == "kept":
                continue
            total -= size
            count -= 1
            if outcome == "removed":
                removed += 1
                logger.debug("evicted prompt cache entry %s (%d bytes)", _short(digest), size)
        if removed:
            logger.info("evicted %d prompt cache entr%s", removed, "y" if removed == 1 else "ies")
        if total > self.max_bytes or count > self.max_entries:
            logger.info("prompt cache stays over budget (%d entries, %d bytes): the rest are in use", count, total)
        return removed

    def clear(self) -> None:
        """Remove every entry, and staging files older than :data:`STALE_TMP_SECONDS`.

        Waits up to ``lock_timeout`` per entry for its readers; an entry that
        stays locked is kept with a warning. Younger staging files may belong
        to a running save and are left to their :meth:`commit`. Files in the
        directory that the store did not make are never touched.

        Raises:
            CacheError: the directory cannot be listed or a lock file cannot be
                created or locked.
        """
        kinds, tmps = self._scan()
        for digest in sorted(kinds):
            with _entry_lock(self._lock_path(digest), exclusive=True, timeout=self.lock_timeout) as locked:
                if not locked:
                    logger.warning("prompt cache entry %s is in use; not cleared", _short(digest))
                    continue
                self._remove_files(digest)
        self._remove_stale_tmps(tmps)
        logger.info("cleared prompt cache %s", self.directory)

    # -- listing ----------------------------------------------------------------

    def entries(self) -> list[CacheEntryInfo]:
        """The valid entries, least recently used first.

        A snapshot taken without locks; invalid entries are left out (and left
        alone: :meth:`lookup` and :meth:`evict` remove them).

        Returns:
            One :class:`CacheEntryInfo` per valid entry.

        Raises:
            CacheError: the directory cannot be listed.
        """
        kinds, _ = self._scan()
        infos: list[tuple[int, CacheEntryInfo]] = []
        for digest, present in kinds.items():
            if present == {"lock"}:
                continue
            state = self._inspect(digest)
            if not isinstance(state, _Meta):
                continue
            info = CacheEntryInfo(
                digest=digest,
                path=self._data_path(digest),
                size=state.size,
                last_used=state.last_used_ns / 1e9,
                fields=state.fields,
                model=state.model,
                created=state.created,
                extra=state.extra,
            )
            infos.append((state.last_used_ns, info))
        infos.sort(key=lambda pair: (pair[0], pair[1].digest))
        return [info for _, info in infos]
