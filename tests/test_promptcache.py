"""The prompt cache store: keys, validation, atomic commits, locking and LRU eviction.

Everything runs against a real directory; the cross-process tests use
``multiprocessing`` with the spawn start method so each worker is a fresh
interpreter with its own file descriptors and ``flock`` locks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import queue
import random
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.chat.promptcache import (
    STALE_TMP_SECONDS,
    CacheKey,
    PromptCacheStore,
    default_cache_dir,
    model_identity,
)
from rkllm_core.errors import CacheError, InvalidParameterError

LOGGER = "rkllm_core.chat.promptcache"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "Qwen3-0.6B-w8a8.rkllm"
    path.parent.mkdir()
    path.write_bytes(b"model-a" * 100)
    return path


@pytest.fixture
def other_model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "gemma-3-1b.rkllm"
    path.write_bytes(b"model-b" * 50)
    return path


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(cache_dir: Path) -> PromptCacheStore:
    return PromptCacheStore(cache_dir, lock_timeout=5.0)


def put(store: PromptCacheStore, key: CacheKey, data: bytes, **kwargs: Any) -> Path | None:
    staged = store.staging_path(key)
    staged.write_bytes(data)
    return store.commit(key, staged, **kwargs)


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def entry_files(store: PromptCacheStore, key: CacheKey) -> tuple[Path, Path]:
    return store.directory / f"{key.digest}.cache", store.directory / f"{key.digest}.json"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------
# Keys and model identity
# --------------------------------------------------------------------------


DIGEST_SCRIPT = """
import sys
from rkllm_core.chat.promptcache import PromptCacheStore
store = PromptCacheStore(sys.argv[1])
print(store.make_key(sys.argv[2], template=sys.argv[4], system=sys.argv[3], abi="1.3").digest)
"""


def test_make_key_is_stable_across_calls_and_processes(store: PromptCacheStore, model: Path) -> None:
    system, template = "You are terse. Système ✓", "<|im_start|>{}"
    key = store.make_key(model, system=system, abi="1.3", template=template)
    again = store.make_key(str(model), abi="1.3", template=template, system=system)
    assert key == again and key.digest == again.digest and hash(key) == hash(again)
    assert len(key.digest) == 64 and int(key.digest, 16) >= 0
    assert list(key.fields) == ["abi", "system", "template"]
    assert key.model == model_identity(model)

    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT, str(store.directory), str(model), system, template],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert out.stdout.strip() == key.digest


def test_make_key_differs_for_other_fields_or_model(store: PromptCacheStore, model: Path, other_model: Path) -> None:
    base = store.make_key(model, system="a", abi="1.3")
    assert store.make_key(model, system="b", abi="1.3").digest != base.digest
    assert store.make_key(model, system="a", abi="1.2").digest != base.digest
    assert store.make_key(model, system="a").digest != base.digest
    assert store.make_key(model, system="a", abi="1.3", tools="").digest != base.digest
    # a value that looks like a field boundary must not collide with two fields
    assert store.make_key(model, system="a", abi="1.3x").digest != store.make_key(model, system="a", abi="1.3").digest
    assert store.make_key(other_model, system="a", abi="1.3").digest != base.digest


def test_cache_key_is_self_consistent(store: PromptCacheStore, model: Path) -> None:
    key = store.make_key(model, system="a")
    with pytest.raises(TypeError):
        key.fields["system"] = "b"  # type: ignore[index]
    with pytest.raises(InvalidParameterError):
        CacheKey("0" * 64, key.model, key.fields)
    with pytest.raises(InvalidParameterError):
        CacheKey(key.digest, key.model, {"system": "b"})
    assert CacheKey(key.digest, key.model, dict(key.fields)) == key
    with pytest.raises(InvalidParameterError):
        store.make_key(model, system=3)  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(key)) == key and copy.deepcopy(key).fields == key.fields


def test_model_identity(model: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.rkllm"
    link.symlink_to(model)
    st = model.stat()
    assert model_identity(link) == f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    with pytest.raises(CacheError):
        model_identity(tmp_path / "missing.rkllm")
    with pytest.raises(CacheError):
        model_identity(tmp_path)


def test_changed_model_misses_and_invalidate_model_removes_old_entries(
    store: PromptCacheStore, model: Path, other_model: Path
) -> None:
    old_a = store.make_key(model, system="a")
    old_b = store.make_key(model, system="b")
    other = store.make_key(other_model, system="a")
    for key in (old_a, old_b, other):
        assert put(store, key, key.digest.encode()) is not None

    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "rewritten"
    new_a = store.make_key(model, system="a")
    assert new_a.digest != old_a.digest
    assert store.lookup(new_a) is None
    assert put(store, new_a, b"new") is not None

    assert store.invalidate_model(model) == 2
    assert store.lookup(old_a) is None and store.lookup(old_b) is None
    assert store.lookup(new_a) is not None
    assert store.lookup(other) is not None
    assert store.invalidate_model(model) == 0

    model.unlink()  # a deleted model file invalidates every entry made for its path
    assert store.invalidate_model(model) == 1
    assert {e.digest for e in store.entries()} == {other.digest}


# --------------------------------------------------------------------------
# Commit and lookup
# --------------------------------------------------------------------------


def test_commit_lookup_round_trip_and_restart(store: PromptCacheStore, model: Path, cache_dir: Path) -> None:
    assert not cache_dir.exists()  # created lazily
    key = store.make_key(model, system="sys", template="tpl")
    assert store.lookup(key) is None
    assert not cache_dir.exists()  # a miss creates nothing

    staged = store.staging_path(key)
    assert staged.parent == cache_dir and not staged.exists() and staged.name.endswith(".tmp")
    assert store.staging_path(key) != staged
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    payload = os.urandom(5000)
    staged.write_bytes(payload)
    final = store.commit(key, staged, extra={"tokens": 42, "when": object()})

    assert final == cache_dir / f"{key.digest}.cache"
    assert not staged.exists()
    assert final.read_bytes() == payload
    meta = json.loads((cache_dir / f"{key.digest}.json").read_text())
    assert meta["digest"] == key.digest and meta["model"] == key.model
    assert meta["fields"] == {"system": "sys", "template": "tpl"}
    assert meta["size"] == 5000 and meta["extra"]["tokens"] == 42 and isinstance(meta["extra"]["when"], str)
    assert not [n for n in names(cache_dir) if n.endswith(".tmp")]

    assert store.lookup(key) == final
    with store.reading(key) as path:
        assert path == final and path.read_bytes() == payload

    restarted = PromptCacheStore(cache_dir)
    same_key = restarted.make_key(model, template="tpl", system="sys")
    assert restarted.lookup(same_key) == final
    [info] = restarted.entries()
    assert info.digest == key.digest and info.path == final and info.size == 5000
    assert dict(info.fields) == {"system": "sys", "template": "tpl"} and info.extra["tokens"] == 42
    assert info.last_used >= info.created - 1


def test_extra_that_json_cannot_hold(store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = store.make_key(model, system="s")
    assert put(store, key, b"x", extra={"set": {1}, "tuple": (1, 2)}) is not None
    [info] = store.entries()
    assert dict(info.extra) == {"set": "{1}", "tuple": [1, 2]}
    assert pickle.loads(pickle.dumps(info)) == info
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert put(store, key, b"y", extra={(1, 2): "tuple key"}) is not None
    assert warnings_of(caplog)
    assert store.lookup(key) is not None
    assert "tuple key" in str(store.entries()[0].extra["repr"])


def test_commit_replaces_the_previous_file(store: PromptCacheStore, model: Path) -> None:
    key = store.make_key(model, system="s")
    first = put(store, key, b"first")
    second = put(store, key, b"second version")
    assert first == second and second is not None
    assert second.read_bytes() == b"second version"
    assert store.lookup(key) == second
    assert len(store.entries()) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "too_large"])
def test_commit_refuses_bad_staged_files(
    store: PromptCacheStore, model: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.max_bytes = 100
    key = store.make_key(model, system="s")
    staged = store.staging_path(key)
    if case == "empty":
        staged.touch()
    elif case == "directory":
        staged.mkdir()
    elif case == "too_large":
        staged.write_bytes(b"x" * 101)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.commit(key, staged) is None
    assert warnings_of(caplog)
    assert store.lookup(key) is None
    assert case == "directory" or not staged.exists()
    assert not {f"{key.digest}.cache", f"{key.digest}.json"} & names(store.directory)


def test_commit_from_another_file_system(store: PromptCacheStore, model: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    store.directory.mkdir(parents=True)
    if shm.stat().st_dev == store.directory.stat().st_dev:
        pytest.skip("/dev/shm is on the same file system as the store")
    key = store.make_key(model, system="s")
    staged = shm / f"rkllm-promptcache-test-{os.getpid()}-{random.getrandbits(32)}"
    staged.write_bytes(b"payload")
    try:
        final = store.commit(key, staged)
    finally:
        staged.unlink(missing_ok=True)
    assert final is not None and final.read_bytes() == b"payload"
    assert not staged.exists()
    assert not [n for n in names(store.directory) if n.endswith(".tmp")]


# --------------------------------------------------------------------------
# Invalid entries
# --------------------------------------------------------------------------


def corrupt_garbage(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    entry_files(store, key)[1].write_bytes(b"\x00{not json at all")


def corrupt_other_key(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    entry_files(store, key)[1].write_bytes(entry_files(store, other)[1].read_bytes())


def corrupt_missing_data(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    entry_files(store, key)[0].unlink()


def corrupt_missing_sidecar(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    # a crash between the data rename and the sidecar write
    data, meta = entry_files(store, key)
    meta.unlink()
    data.write_bytes(b"y" * data.stat().st_size)


def corrupt_wrong_size(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    with entry_files(store, key)[0].open("ab") as fh:
        fh.write(b"more")


def corrupt_edited_fields(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    meta_path = entry_files(store, key)[1]
    meta = json.loads(meta_path.read_text())
    meta["fields"]["system"] = "edited"
    meta_path.write_text(json.dumps(meta))


def corrupt_symlinked_data(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    data = entry_files(store, key)[0]
    elsewhere = store.directory.parent / "elsewhere"
    elsewhere.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(elsewhere)


def corrupt_wrong_format(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    meta_path = entry_files(store, key)[1]
    meta = json.loads(meta_path.read_text())
    meta["format"] = 99
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_garbage,
        corrupt_other_key,
        corrupt_missing_data,
        corrupt_missing_sidecar,
        corrupt_wrong_size,
        corrupt_edited_fields,
        corrupt_wrong_format,
        corrupt_symlinked_data,
    ],
)
@pytest.mark.parametrize("via", ["lookup", "reading"])
def test_invalid_entry_is_removed_with_a_warning(
    store: PromptCacheStore, model: Path, corrupt: Any, via: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = store.make_key(model, system="mine")
    other = store.make_key(model, system="theirs")
    assert put(store, key, b"m" * 64) is not None
    assert put(store, other, b"t" * 32) is not None
    corrupt(store, key, other)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        if via == "lookup":
            assert store.lookup(key) is None
        else:
            with store.reading(key) as path:
                assert path is None
    assert any(key.digest[:12] in m and "invalid" in m for m in warnings_of(caplog)), warnings_of(caplog)
    data, meta = entry_files(store, key)
    assert not data.exists() and not meta.exists()
    assert store.lookup(other) is not None  # the other entry is untouched
    assert put(store, key, b"fresh") is not None  # and the key can be committed again
    assert store.lookup(key) is not None


CRASH_SCRIPT = """
import os, sys
from rkllm_core.chat.promptcache import PromptCacheStore
def crash(*args, **kwargs):
    os._exit(3)  # dies between the data rename and the sidecar write, no cleanup
PromptCacheStore._write_meta = crash
store = PromptCacheStore(sys.argv[1])
key = store.make_key(sys.argv[2], system="s")
staged = store.staging_path(key)
staged.write_bytes(b"N" * 100)
store.commit(key, staged)
"""


def test_crash_during_commit_is_detected(
    store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = store.make_key(model, system="s")
    put(store, key, b"O" * 100)  # same size as the crashing commit's payload
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(store.directory), str(model)], check=False)
    assert proc.returncode == 3
    assert entry_files(store, key)[0].read_bytes() == b"N" * 100  # new data, no metadata for it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.lookup(key) is None  # never the new data under the old metadata
    assert any("metadata file missing" in m for m in warnings_of(caplog))
    assert not entry_files(store, key)[0].exists()


def test_evict_removes_crash_leftovers_and_stale_staging_files(store: PromptCacheStore, model: Path) -> None:
    good = store.make_key(model, system="good")
    broken = store.make_key(model, system="broken")
    put(store, good, b"g" * 10)
    put(store, broken, b"b" * 10)
    entry_files(store, broken)[1].unlink()  # data without sidecar
    orphan_lock = store.directory / f"{'a' * 64}.lock"
    orphan_lock.touch()
    old_tmp = store.staging_path(good)
    old_tmp.write_bytes(b"abandoned")
    long_ago = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old_tmp, (long_ago, long_ago))
    fresh_tmp = store.staging_path(good)
    fresh_tmp.write_bytes(b"being written")
    foreign = store.directory / "notes.txt"
    foreign.write_text("not ours")
    os.utime(foreign, (long_ago, long_ago))

    assert store.evict() == 1
    left = names(store.directory)
    assert f"{broken.digest}.cache" not in left and f"{broken.digest}.lock" not in left
    assert orphan_lock.name not in left and old_tmp.name not in left
    assert {fresh_tmp.name, foreign.name, f"{good.digest}.cache"} <= left
    assert store.lookup(good) is not None


# --------------------------------------------------------------------------
# Invalidation and clearing
# --------------------------------------------------------------------------


def test_invalidate_logs_the_reason(store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = store.make_key(model, system="s")
    put(store, key, b"data")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store.invalidate(key, "runtime failed to load it")
    assert any("runtime failed to load it" in m for m in warnings_of(caplog))
    assert store.lookup(key) is None
    assert not names(store.directory)
    store.invalidate(key, "again")  # nothing there: no error


def test_invalidate_and_commit_inside_reading_do_not_deadlock(store: PromptCacheStore, model: Path) -> None:
    store.lock_timeout = 2.0
    key = store.make_key(model, system="s")
    put(store, key, b"old")
    with store.reading(key) as path:
        assert path is not None
        store.invalidate(key, "load failed")
        assert store.lookup(key) is None
        assert put(store, key, b"new") is not None
    assert store.lookup(key) is not None and store.lookup(key).read_bytes() == b"new"  # type: ignore[union-attr]

    with store.reading(key) as path:  # a commit inside a hit replaces the file
        assert put(store, key, b"newer") == path
    assert path is not None and path.read_bytes() == b"newer"


def test_clear(store: PromptCacheStore, model: Path) -> None:
    keys = [store.make_key(model, system=str(i)) for i in range(3)]
    for key in keys:
        put(store, key, b"x")
    fresh_tmp = store.staging_path(keys[0])
    fresh_tmp.write_bytes(b"in flight")
    store.clear()
    assert store.entries() == []
    assert names(store.directory) == {fresh_tmp.name}
    assert all(store.lookup(k) is None for k in keys)


# --------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------


class HeldReader:
    """A thread that holds ``reading(key)`` until released."""

    def __init__(self, store: PromptCacheStore, key: CacheKey) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.path: Path | None = None
        self.content: bytes | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(store, key), daemon=True)
        self.thread.start()
        assert self.entered.wait(10)

    def _run(self, store: PromptCacheStore, key: CacheKey) -> None:
        try:
            with store.reading(key) as path:
                self.path = path
                self.entered.set()
                self.release.wait(20)
                self.content = path.read_bytes() if path is not None else None
        except BaseException as exc:
            self.error = exc
            self.entered.set()

    def finish(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_commit_waits_for_a_reader_and_times_out(store: PromptCacheStore, model: Path) -> None:
    key = store.make_key(model, system="s")
    put(store, key, b"old" * 1000)
    reader = HeldReader(store, key)
    threading.Timer(0.3, reader.release.set).start()
    started = time.monotonic()
    assert put(store, key, b"new") is not None
    assert time.monotonic() - started >= 0.25  # the commit waited for the shared lock
    reader.finish()
    assert reader.content == b"old" * 1000

    store.lock_timeout = 0.2
    reader = HeldReader(store, key)
    try:
        staged = store.staging_path(key)
        staged.write_bytes(b"blocked")
        assert store.commit(key, staged) is None
        assert not staged.exists()
    finally:
        reader.finish()
    assert reader.content == b"new"
    assert store.lookup(key).read_bytes() == b"new"  # type: ignore[union-attr]


# --------------------------------------------------------------------------
# Eviction
# --------------------------------------------------------------------------


def test_lru_eviction_by_count_survives_restart(store: PromptCacheStore, model: Path) -> None:
    store.max_entries = 3
    keys = [store.make_key(model, system=f"prompt {i}") for i in range(4)]
    for key in keys[:3]:
        put(store, key, b"x" * 10)
    assert store.lookup(keys[0]) is not None  # 0 is now the most recently used
    put(store, keys[3], b"x" * 10)  # over budget: the least recently used (1) goes
    assert store.lookup(keys[1]) is None
    assert [e.digest for e in store.entries()] == [keys[2].digest, keys[0].digest, keys[3].digest]

    restarted = PromptCacheStore(store.directory, max_entries=2)
    assert restarted.evict() == 1
    assert {e.digest for e in restarted.entries()} == {keys[0].digest, keys[3].digest}


def test_lru_eviction_by_bytes(store: PromptCacheStore, model: Path) -> None:
    store.max_bytes = 250
    a, b, c = (store.make_key(model, system=s) for s in "abc")
    put(store, a, b"a" * 100)
    put(store, b, b"b" * 100)
    assert store.lookup(a) is not None
    put(store, c, b"c" * 100)
    assert store.lookup(b) is None
    assert store.lookup(a) is not None and store.lookup(c) is not None
    assert sum(e.size for e in store.entries()) == 200


def test_eviction_skips_entries_held_by_a_reader(store: PromptCacheStore, model: Path) -> None:
    keys = [store.make_key(model, system=str(i)) for i in range(3)]
    for key in keys:
        put(store, key, key.digest.encode() * 10)
    # keys[0] is the least recently used, and held by another thread
    reader = HeldReader(store, keys[0])
    try:
        evictor = PromptCacheStore(store.directory, max_entries=0)
        assert evictor.evict() == 2
        assert {e.digest for e in evictor.entries()} == {keys[0].digest}
    finally:
        reader.finish()
    assert reader.content == keys[0].digest.encode() * 10  # read in full after the eviction ran

    # the calling thread's own reader is skipped too
    with evictor.reading(keys[0]) as path:
        assert path is not None
        assert evictor.evict() == 0
        assert path.read_bytes() == keys[0].digest.encode() * 10
    assert evictor.evict() == 1
    assert evictor.entries() == []


# --------------------------------------------------------------------------
# Concurrency across processes
# --------------------------------------------------------------------------

COMMITS_PER_WRITER = 20


def payload(worker: int, i: int) -> bytes:
    size = 200_000 + 9_973 * i + 79_193 * worker
    return f"{worker}:{i}:".encode() + random.Random(worker * 1000 + i).randbytes(size)


def _committer(directory: str, model: str, worker: int, go: Any, results: Any) -> None:
    try:
        store = PromptCacheStore(directory)
        key = store.make_key(model, system="shared system prompt")
        go.wait(60)
        for i in range(COMMITS_PER_WRITER):
            data = payload(worker, i)
            staged = store.staging_path(key)
            with open(staged, "wb") as fh:  # written in pieces, like the runtime would
                for start in range(0, len(data), 8192):
                    fh.write(data[start : start + 8192])
            if store.commit(key, staged) is None:
                raise AssertionError(f"commit {i} of worker {worker} returned None")
        results.put(("ok", f"writer {worker}", key.digest))
    except BaseException:
        results.put(("error", f"writer {worker}", traceback.format_exc()))


def _looker(directory: str, model: str, go: Any, done: Any, results: Any) -> None:
    try:
        expected = {hashlib.sha256(payload(w, i)).hexdigest() for w in (0, 1) for i in range(COMMITS_PER_WRITER)}
        store = PromptCacheStore(directory)
        key = store.make_key(model, system="shared system prompt")
        final = store.directory / f"{key.digest}.cache"
        go.wait(60)
        hits = misses = 0
        bad: list[str] = []
        n = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            finished = done.is_set()
            if n % 2:
                with store.reading(key) as path:
                    data = path.read_bytes() if path is not None else None
            else:
                path = store.lookup(key)
                data = path.read_bytes() if path is not None else None  # unlocked: may be replaced meanwhile
            n += 1
            if data is None:
                misses += 1
            elif hashlib.sha256(data).hexdigest() in expected:
                hits += 1
            else:
                bad.append(f"lookup: {len(data)} bytes starting {data[:12]!r}")
            # No lock at all: the final name only ever holds a complete file.
            try:
                raw = final.read_bytes()
            except FileNotFoundError:
                raw = None
            if raw is not None and hashlib.sha256(raw).hexdigest() not in expected:
                bad.append(f"raw: {len(raw)} bytes starting {raw[:12]!r}")
            if finished:
                break
        results.put(("ok", "looker", (hits, misses, bad, finished)))
    except BaseException:
        results.put(("error", "looker", traceback.format_exc()))


@pytest.mark.slow
def test_concurrent_commits_and_lookups_across_processes(cache_dir: Path, model: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    go, done, results = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_committer, args=(str(cache_dir), str(model), w, go, results)) for w in (0, 1)]
    looker = ctx.Process(target=_looker, args=(str(cache_dir), str(model), go, done, results))
    procs = [*writers, looker]
    for p in procs:
        p.start()
    try:
        reports: dict[str, Any] = {}
        while len(reports) < 2:
            status, who, detail = results.get(timeout=120)
            assert status == "ok", f"{who} failed:\n{detail}"
            reports[who] = detail
        done.set()
        status, who, detail = results.get(timeout=120)
        assert status == "ok", f"{who} failed:\n{detail}"
        hits, misses, bad, finished = detail
    except queue.Empty:
        pytest.fail("a worker did not report")
    finally:
        done.set()
        go.abort()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)

    assert bad == [], "a lookup returned a file that is not one complete payload"
    assert finished and hits >= 1, (hits, misses)
    store = PromptCacheStore(cache_dir)
    key = store.make_key(model, system="shared system prompt")
    assert reports["writer 0"] == reports["writer 1"] == key.digest  # same digest in every process
    final = store.lookup(key)
    assert final is not None
    last = {hashlib.sha256(payload(w, COMMITS_PER_WRITER - 1)).hexdigest() for w in (0, 1)}
    assert hashlib.sha256(final.read_bytes()).hexdigest() in last  # the last writer won
    assert [e.digest for e in store.entries()] == [key.digest]
    assert not [n for n in names(cache_dir) if n.endswith(".tmp")]


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def test_default_directory_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = PromptCacheStore()
    assert store.directory == tmp_path / "explicit"
    assert not store.directory.exists()

    monkeypatch.delenv("RKLLM_PROMPT_CACHE_DIR")
    assert PromptCacheStore().directory == tmp_path / "xdg" / "rkllm-core" / "prompt-cache"
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", "")
    assert default_cache_dir() == tmp_path / "xdg" / "rkllm-core" / "prompt-cache"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert PromptCacheStore().directory == tmp_path / "home" / ".cache" / "rkllm-core" / "prompt-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert PromptCacheStore().directory == tmp_path / "home" / ".cache" / "rkllm-core" / "prompt-cache"

    assert PromptCacheStore("~/elsewhere").directory == tmp_path / "home" / "elsewhere"


@pytest.mark.parametrize("kwargs", [{"max_bytes": -1}, {"max_entries": -1}, {"max_entries": 1.5}, {"lock_timeout": -1}])
def test_constructor_rejects_bad_budgets(kwargs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError):
        PromptCacheStore(tmp_path, **kwargs)


def test_malformed_digest_is_rejected(store: PromptCacheStore, model: Path) -> None:
    key = store.make_key(model, system="s")
    object.__setattr__(key, "digest", "../../etc/passwd")
    with pytest.raises(InvalidParameterError):
        store.lookup(key)
    with pytest.raises(InvalidParameterError):
        store.staging_path(key)
