"""A content-addressed, write-once on-disk store for the runtime's prompt (KV) cache files.

The runtime saves the KV state after a run's prefill to a file (``save_prompt_cache=<path>``)
and loads it later (``load_prompt_cache(path)``), so a run whose input starts with the same
prefix skips that prefill. This module decides where those files live and when they go::

    key = store.make_key(model_path, system=system_prompt, runtime="1.3.0")
    path = store.lookup(key)                   # None: miss
    if path is None:
        staged = store.staging_path(key)       # run with save_prompt_cache=staged, then
        store.commit(key, staged)              # or store.discard(staged) if the run failed
    elif not runtime_loaded(path):
        store.invalidate(key, "the runtime could not load it")

Layout (``<digest>``: the key's SHA-256, the same in every process):

* ``<digest>.cache``: the runtime's file, put in place only by ``os.replace`` of a complete,
  fsynced staged file and never written again, so readers need no lock. Its mtime is the
  entry's last-used time (LRU order survives restarts); a hit touches it.
* ``<digest>.json``: a sidecar (digest, model identity, fields, size, a fingerprint of the data
  file's content, created, extra), kept
  because :meth:`~PromptCacheStore.entries` and :meth:`~PromptCacheStore.invalidate_model` need
  the model identity and fields, which a digest cannot give back. It is written (temporary file
  + ``os.replace``) *before* the data file is renamed into place and removed *after* it, so data
  without a valid sidecar of the same size is never a normal state: such an entry is invalid and
  is removed with a warning. A sidecar without data (a commit in progress, or a crash) is a miss.
  Before a file is handed to the runtime its content is checked against the fingerprint (the
  SHA-256 of its first 256 KiB and last 64 KiB): a file swapped in for another model or prompt, or
  corrupted in place, is never loaded — it is removed and the prefix is computed again.
* ``<digest>.<pid>.<random>.tmp`` and ``.json.tmp``: staging files.

There are no locks: a race costs at most one prefill (a file evicted before the runtime loads
it fails to load; two simultaneous commits of one key leave one of two equivalent files, or an
entry the size check rejects). Disk trouble never raises: it is logged (each kind at most once
a minute per store) and becomes a miss or a dropped commit. Only :meth:`~PromptCacheStore.make_key`
raises :class:`~rkllm_core.errors.CacheError`, and bad arguments
:class:`~rkllm_core.errors.InvalidParameterError`. The directory is created with mode 0700:
sidecars may hold the system prompt.
"""

from __future__ import annotations

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from ..errors import CacheError, InvalidParameterError

_replace = os.replace  # the renames that put entries in place (a seam for disk-full tests)

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
#: Staging files and data-less sidecars older than this (by mtime) are crash leftovers.
STALE_TMP_SECONDS: Final = 3600.0

_SCHEME: Final = "rkllm-core/prompt-cache"
_WARN_INTERVAL: Final = 60.0
_MAX_META_BYTES: Final = 16 * 1024 * 1024
_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")
_ENTRY_RE: Final = re.compile(r"([0-9a-f]{64})\.(cache|json)")
# Staging files, and the lock files of the earlier flock-based store.
_LEFTOVER_RE: Final = re.compile(r"[0-9a-f]{64}(?:\.[0-9]+\.[0-9a-f]+(?:\.json)?\.tmp|\.lock)")


def model_identity(path: str | os.PathLike[str]) -> str:
    """``"<resolved path>|<size>|<mtime_ns>"`` of a model file: rewriting or touching it changes every key.

    Raises:
        CacheError: the file does not exist, cannot be examined or is not a regular file.
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


def _compute_digest(model: str, fields: Mapping[str, str]) -> str:
    payload = json.dumps(
        {"scheme": _SCHEME, "format": FORMAT_VERSION, "model": model, "fields": dict(sorted(fields.items()))},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,  # also escapes lone surrogates from undecodable paths
    )
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def _checked_fields(fields: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(fields, Mapping):
        raise InvalidParameterError(f"cache key fields must be a mapping, not {type(fields).__name__}")
    for name, value in fields.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidParameterError(f"cache key fields must map str to str; {name!r} is {type(value).__name__}")
    return dict(sorted(fields.items()))


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a cache file was made for; build keys with :meth:`PromptCacheStore.make_key`.

    Construction checks that ``digest`` is the digest of ``model`` and ``fields``.

    Attributes:
        digest: hex SHA-256 over the scheme, the model identity and the sorted fields.
        model: the model file's :func:`model_identity`.
        fields: the other inputs (system prompt, template, versions, ...), sorted, read-only.
    """

    digest: str
    model: str
    fields: Mapping[str, str] = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise InvalidParameterError(f"CacheKey.model must be a str, not {type(self.model).__name__}")
        ordered = _checked_fields(self.fields)
        object.__setattr__(self, "fields", MappingProxyType(ordered))
        if not isinstance(self.digest, str) or self.digest != _compute_digest(self.model, ordered):
            raise InvalidParameterError("CacheKey.digest is not the digest of its model and fields; use make_key()")

    def __reduce__(self) -> tuple[Any, ...]:  # mappingproxy does not pickle
        return (CacheKey, (self.digest, self.model, dict(self.fields)))


@dataclass(frozen=True, slots=True)
class CacheEntryInfo:
    """One valid entry, as listed by :meth:`PromptCacheStore.entries`.

    Attributes:
        digest: the key's digest (the file name stem).
        path: the data file.
        size: the data file's size in bytes.
        last_used: last commit or hit (the data file's mtime, seconds since the epoch).
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
        head = (self.digest, self.path, self.size, self.last_used, dict(self.fields), self.model, self.created)
        return (CacheEntryInfo, (*head, dict(self.extra)))


_HEAD_BYTES: Final = 256 * 1024
_TAIL_BYTES: Final = 64 * 1024


def _fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's size, first 256 KiB and last 64 KiB: what ties a data file to its entry."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(str(size).encode())
        h.update(fh.read(_HEAD_BYTES))
        if size > _HEAD_BYTES:
            fh.seek(max(_HEAD_BYTES, size - _TAIL_BYTES))
            h.update(fh.read(_TAIL_BYTES))
    return h.hexdigest()


def _parse_meta(raw: bytes, digest: str) -> dict[str, Any] | str:
    """A sidecar's content if it is self-consistent, else why it is not."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "metadata is not valid JSON"
    if not isinstance(doc, dict):
        return "metadata is not a JSON object"
    if doc.get("format") != FORMAT_VERSION:
        return f"metadata format {doc.get('format')!r} is not {FORMAT_VERSION}"
    if doc.get("digest") != digest:
        return "metadata names another digest"
    model, fields, size, created = (doc.get(k) for k in ("model", "fields", "size", "created"))
    if not isinstance(model, str) or not isinstance(fields, dict):
        return "metadata has no model identity or fields"
    if not all(isinstance(v, str) for v in fields.values()) or _compute_digest(model, fields) != digest:
        return "metadata does not hash to its digest"
    if type(size) is not int or size <= 0 or type(created) not in (int, float):
        return "metadata has no valid size or creation time"
    if not isinstance(doc.get("content"), str):
        return "metadata has no content fingerprint (written by an older version)"
    if not isinstance(doc.setdefault("extra", {}), dict):
        return "metadata extra is not an object"
    return doc


def _jsonable(extra: Mapping[str, object] | None) -> dict[str, object]:
    """``extra`` as it will read back from the sidecar; values JSON cannot hold become strings."""
    try:
        loaded = json.loads(json.dumps(dict(extra or {}), default=str, ensure_ascii=True))
    except (TypeError, ValueError, RecursionError) as exc:  # non-str keys, cycles
        logger.warning("prompt cache extra metadata is not JSON-able (%s); storing its repr", exc)
        return {"repr": repr(extra)}
    return loaded if isinstance(loaded, dict) else {"repr": repr(extra)}


def default_cache_dir() -> Path:
    """The default store directory (absolute, not created).

    ``$RKLLM_PROMPT_CACHE_DIR`` if set and not empty, else ``$XDG_CACHE_HOME/rkllm-core/prompt-cache``
    when ``XDG_CACHE_HOME`` is absolute (as the XDG spec requires), else ``~/.cache/rkllm-core/prompt-cache``.
    """
    env = os.environ.get(ENV_PROMPT_CACHE_DIR)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return (base / "rkllm-core" / "prompt-cache").absolute()


class PromptCacheStore:
    """A directory of prompt cache files keyed by :class:`CacheKey`, shared by threads and processes.

    Nothing is touched on disk until the first write. Every method is thread-safe.

    Args:
        directory: the store directory; default :func:`default_cache_dir`.
        max_bytes: budget for the data files' total size; also the largest file :meth:`commit` takes.
        max_entries: budget for the number of entries.

    Raises:
        InvalidParameterError: a budget is not an int >= 0, or ``directory`` is not a path.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        for name, value in (("max_bytes", max_bytes), ("max_entries", max_entries)):
            if type(value) is not int or value < 0:
                raise InvalidParameterError(f"{name} must be an int >= 0, not {value!r}")
        if directory is not None and not isinstance(directory, str | os.PathLike):
            raise InvalidParameterError(f"directory must be a path, not {type(directory).__name__}")
        self.directory: Path = default_cache_dir() if directory is None else Path(directory).expanduser().absolute()
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._warned: dict[str, float] = {}
        self._warn_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PromptCacheStore({str(self.directory)!r}, max_bytes={self.max_bytes}, max_entries={self.max_entries})"

    def make_key(self, model_path: str | os.PathLike[str], **fields: str) -> CacheKey:
        """The key (same digest in every process) for a model file and what else the KV state depends on.

        Args:
            model_path: the model file; its :func:`model_identity` goes into the key.
            **fields: str values (system prompt, tools, template, ABI and runtime versions, ...).

        Raises:
            CacheError: the model file cannot be examined.
            InvalidParameterError: a field value is not a str.
        """
        checked = _checked_fields(fields)
        model = model_identity(model_path)
        return CacheKey(_compute_digest(model, checked), model, checked)

    # -- helpers -------------------------------------------------------------

    def _data(self, digest: str) -> Path:
        return self.directory / f"{digest}.cache"

    def _meta(self, digest: str) -> Path:
        return self.directory / f"{digest}.json"

    def _tmp(self, digest: str, suffix: str = ".tmp") -> Path:
        return self.directory / f"{digest}.{os.getpid()}.{secrets.token_hex(8)}{suffix}"

    @staticmethod
    def _digest(key: CacheKey) -> str:
        if not isinstance(key, CacheKey):
            raise InvalidParameterError(f"expected a CacheKey, not {type(key).__name__}")
        if not isinstance(key.digest, str) or not _DIGEST_RE.fullmatch(key.digest):
            raise InvalidParameterError(f"malformed cache key digest {key.digest!r}")
        return key.digest

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        """Log a warning at most once a minute per ``kind`` (at debug level in between)."""
        now = time.monotonic()
        with self._warn_lock:
            quiet = now - self._warned.get(kind, -_WARN_INTERVAL) < _WARN_INTERVAL
            if not quiet:
                self._warned[kind] = now
        logger.log(logging.DEBUG if quiet else logging.WARNING, msg, *args)

    def _mkdir(self) -> bool:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return True
        except OSError as exc:
            self._warn("directory", "cannot create prompt cache directory %s: %s", self.directory, exc)
            return False

    def _unlink(self, path: str | os.PathLike[str]) -> bool:
        try:
            os.unlink(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            self._warn("remove", "cannot remove prompt cache file %s: %s", os.fspath(path), exc)
            return False

    def _remove(self, digest: str) -> bool:
        """Remove an entry, data file first; True when there was a data file."""
        removed = self._unlink(self._data(digest))
        self._unlink(self._meta(digest))
        return removed

    def _inspect(self, digest: str) -> tuple[dict[str, Any], os.stat_result] | str | None:
        """Sidecar and data file status of a valid entry, why the entry is invalid, or None (no data, unreadable)."""
        try:
            st = os.lstat(self._data(digest))
        except OSError:  # missing: a miss; unreadable: a miss we cannot clean up
            return None
        if not stat.S_ISREG(st.st_mode):
            return "data file is not a regular file"
        try:
            with open(self._meta(digest), "rb") as fh:
                raw = fh.read(_MAX_META_BYTES + 1)
        except FileNotFoundError:
            return "metadata file missing"
        except OSError as exc:
            logger.debug("cannot read prompt cache metadata %s: %s", digest[:12], exc)
            return None
        meta = _parse_meta(raw, digest) if len(raw) <= _MAX_META_BYTES else "metadata file is too large"
        if not isinstance(meta, str) and meta["size"] != st.st_size:
            meta = f"data file has {st.st_size} bytes, metadata says {meta['size']}"
        return meta if isinstance(meta, str) else (meta, st)

    @staticmethod
    def _touch(path: Path) -> Path:
        """Mark a data file as used now (best effort; a fine-grained clock, unlike the kernel's own)."""
        now = time.time_ns()
        try:
            os.utime(path, ns=(now, now))
        except OSError as exc:
            logger.debug("could not mark prompt cache file %s as used: %s", path, exc)
        return path

    def _drop_invalid(self, digest: str, reason: str) -> bool:
        self._warn(f"invalid {digest}", "prompt cache entry %s is invalid (%s); removing it", digest[:12], reason)
        return self._remove(digest)

    def _scan(self) -> tuple[dict[str, os.DirEntry[str]], dict[str, os.DirEntry[str]], list[os.DirEntry[str]]]:
        """Data files and sidecars by digest, and leftover files (staging, old locks)."""
        found: dict[str, dict[str, os.DirEntry[str]]] = {"cache": {}, "json": {}}
        leftovers: list[os.DirEntry[str]] = []
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if m := _ENTRY_RE.fullmatch(entry.name):
                        found[m[2]][m[1]] = entry
                    elif _LEFTOVER_RE.fullmatch(entry.name):
                        leftovers.append(entry)
        except (FileNotFoundError, NotADirectoryError):
            pass  # nothing committed yet (or a directory that commit already warned about)
        except OSError as exc:
            self._warn("list", "cannot list prompt cache directory %s: %s", self.directory, exc)
        return found["cache"], found["json"], leftovers

    def _remove_stale(self, entries: list[os.DirEntry[str]]) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in entries:
            try:
                old = entry.stat(follow_symlinks=False).st_mtime < cutoff
            except OSError:
                continue
            if old and self._unlink(entry.path):
                logger.info("removed stale prompt cache file %s", entry.name)

    # -- public --------------------------------------------------------------

    def lookup(self, key: CacheKey) -> Path | None:
        """The data file of the key's valid entry (marked as used), else None.

        An invalid entry is removed with a warning; disk errors are misses. The file is not held:
        eviction may delete it before the runtime loads it (a failed load: one prefill).
        """
        digest = self._digest(key)
        state = self._inspect(digest)
        if isinstance(state, tuple):
            try:
                content = _fingerprint(self._data(digest))
            except OSError as exc:
                logger.debug("cannot read prompt cache file %s: %s", digest[:12], exc)
                return None
            if content != state[0]["content"]:
                state = "its content is not the file this entry was made for (swapped or corrupted)"
        if isinstance(state, str):
            self._drop_invalid(digest, state)
        if not isinstance(state, tuple):
            return None
        return self._touch(self._data(digest))

    def entries(self) -> list[CacheEntryInfo]:
        """The valid entries, least recently used first (invalid ones are skipped, not removed)."""
        infos: list[CacheEntryInfo] = []
        for digest in self._scan()[0]:
            if isinstance(state := self._inspect(digest), tuple):
                meta, st = state
                head = (digest, self._data(digest), st.st_size, st.st_mtime_ns / 1e9, meta["fields"], meta["model"])
                infos.append(CacheEntryInfo(*head, float(meta["created"]), meta["extra"]))
        return sorted(infos, key=lambda info: (info.last_used, info.digest))

    def staging_path(self, key: CacheKey) -> Path | None:
        """A fresh ``<directory>/<digest>.<pid>.<random>.tmp`` for the runtime to save a cache file to.

        The directory is created; the file is not. ``None`` when the directory cannot be created
        or written (logged): then nothing should be saved.
        """
        digest = self._digest(key)
        if not self._mkdir() or not os.access(self.directory, os.W_OK | os.X_OK):
            if self.directory.is_dir():
                self._warn("directory", "prompt cache directory %s is not writable", self.directory)
            return None
        return self._tmp(digest)

    def try_key(self, model_path: str | os.PathLike[str], **fields: str) -> CacheKey | None:
        """:meth:`make_key`, or ``None`` (logged) when the model file cannot be examined: the cache is skipped."""
        try:
            return self.make_key(model_path, **fields)
        except CacheError as exc:
            self._warn("model", "prompt cache skipped: %s", exc)
            return None

    def discard(self, staged: str | os.PathLike[str]) -> None:
        """Remove a staged file (from :meth:`staging_path`) after a failed run; best effort, never raises."""
        try:
            os.unlink(staged)
        except (OSError, TypeError):
            pass

    def commit(
        self, key: CacheKey, staged: str | os.PathLike[str], *, extra: Mapping[str, object] | None = None
    ) -> Path | None:
        """Make a staged file the key's entry unless a valid one exists (equal by construction), then evict.

        The file must be a non-empty regular file of at most ``max_bytes``. It is fsynced (copied
        first if it is on another file system), its sidecar is written, and it is renamed into place.

        Args:
            key: the key the file was made for.
            staged: the file the runtime wrote, normally from :meth:`staging_path`.
            extra: JSON-able details for the sidecar (other values are stored as strings).

        Returns:
            The entry's data file, or None when nothing was committed (bad staged file, disk error,
            evicted at once): logged as a warning (once a minute per kind), staged file removed.
        """
        digest, staged, data = self._digest(key), Path(staged), self._data(key.digest)
        if not self._mkdir():
            self.discard(staged)
            return None
        st, problem = self._examine_staged(staged)
        if st is None or problem:
            self._warn("staged", "not committing prompt cache entry %s: %s %s", digest[:12], staged, problem)
            self.discard(staged)
            return None
        state = self._inspect(digest)
        if isinstance(state, tuple):  # write-once: keep the existing file
            self.discard(staged)
            return data
        if isinstance(state, str):
            self._drop_invalid(digest, state)
        doc = {"format": FORMAT_VERSION, "digest": digest, "model": key.model, "fields": dict(key.fields)}
        doc.update(size=st.st_size, created=time.time(), extra=_jsonable(extra))
        if not self._write_entry(digest, staged, st, doc):
            return None
        self._touch(data)  # LRU: used now, not when the runtime wrote it
        logger.info("committed prompt cache entry %s (%d bytes)", digest[:12], st.st_size)
        self.evict()
        if not os.path.lexists(data):
            logger.warning("prompt cache entry %s was evicted right after its commit", digest[:12])
            return None
        return data

    def _examine_staged(self, staged: Path) -> tuple[os.stat_result | None, str]:
        """The staged file's ``lstat``, and what makes it unfit for an entry (``""`` when nothing does)."""
        try:
            st = os.lstat(staged)
        except OSError as exc:
            return None, f"cannot be examined ({exc.strerror or exc})"
        if st.st_size > self.max_bytes:
            return st, f"has {st.st_size} bytes, more than max_bytes {self.max_bytes}"
        return st, "is not a regular file" if not stat.S_ISREG(st.st_mode) else "is empty" if not st.st_size else ""

    def _write_entry(self, digest: str, staged: Path, st: os.stat_result, doc: dict[str, Any]) -> bool:
        """Put a staged file in place as ``digest``'s entry, sidecar first; False (logged, files removed) on failure.

        The file is copied first when it is on another file system, and fsynced before it has its final name.
        """
        meta, meta_tmp = self._meta(digest), self._tmp(digest, ".json.tmp")
        cleanup = [meta_tmp]
        try:
            if os.stat(self.directory).st_dev != st.st_dev:  # os.replace cannot cross file systems
                original, staged = staged, self._tmp(digest)
                try:
                    shutil.copyfile(original, staged)
                finally:
                    self.discard(original)
            with open(staged, "rb") as fh:
                os.fsync(fh.fileno())  # complete on disk before it has its final name
            doc["content"] = _fingerprint(staged)
            with open(meta_tmp, "x", encoding="ascii") as fh:
                json.dump(doc, fh, indent=2, sort_keys=True, ensure_ascii=True)
            _replace(meta_tmp, meta)
            cleanup.append(meta)
            _replace(staged, self._data(digest))
        except OSError as exc:
            self._warn("write", "cannot commit prompt cache entry %s in %s: %s", digest[:12], self.directory, exc)
            for path in (staged, *cleanup):
                self.discard(path)
            return False
        return True

    def invalidate(self, key: CacheKey, reason: str) -> None:
        """Remove the key's entry, e.g. after the runtime failed to load it, logging ``reason`` as a warning."""
        digest = self._digest(key)
        level = logging.WARNING if self._remove(digest) else logging.DEBUG
        logger.log(level, "invalidated prompt cache entry %s: %s", digest[:12], reason)

    def invalidate_model(self, model_path: str | os.PathLike[str]) -> int:
        """Remove every entry made for a model file path (whatever its size and mtime were); return how many."""
        resolved = os.path.realpath(os.fspath(model_path))
        removed = 0
        for digest in self._scan()[1]:
            try:
                meta = _parse_meta(self._meta(digest).read_bytes(), digest)
            except OSError:
                continue
            if isinstance(meta, dict) and meta["model"].rsplit("|", 2)[0] == resolved:
                removed += self._remove(digest)
        if removed:
            logger.info("removed %d prompt cache entries of %s", removed, resolved)
        return removed

    def evict(self) -> int:
        """Remove least recently used entries until within budget, invalid entries, and crash leftovers.

        Leftovers are staging files and data-less sidecars older than :data:`STALE_TMP_SECONDS`
        (younger ones may belong to a commit in progress). An entry used since the listing is
        skipped. Concurrent evictions are harmless: a file already gone is not an error.

        Returns:
            How many entries were removed (invalid ones included).
        """
        data, metas, leftovers = self._scan()
        self._remove_stale(leftovers + [entry for digest, entry in metas.items() if digest not in data])
        removed = 0
        live: list[tuple[int, str, int]] = []
        for digest in data:
            state = self._inspect(digest)
            if isinstance(state, str):
                removed += self._drop_invalid(digest, state)
            elif state is not None:
                live.append((state[1].st_mtime_ns, digest, state[1].st_size))
        live.sort()
        total, count = sum(size for _, _, size in live), len(live)
        for mtime_ns, digest, size in live:
            if total <= self.max_bytes and count <= self.max_entries:
                break
            try:
                if os.lstat(self._data(digest)).st_mtime_ns != mtime_ns:
                    continue  # used since the listing
            except OSError:
                pass
            removed += self._remove(digest)
            total, count = total - size, count - 1
        if removed:
            logger.info("evicted %d prompt cache entr%s", removed, "y" if removed == 1 else "ies")
        return removed

    def clear(self) -> None:
        """Remove every entry and stale staging files (younger ones may belong to a running save)."""
        data, metas, leftovers = self._scan()
        for digest in data.keys() | metas.keys():
            self._remove(digest)
        self._remove_stale(leftovers)
        logger.info("cleared prompt cache %s", self.directory)
