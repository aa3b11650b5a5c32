"""The prompt cache store: keys, write-once commits, validation, LRU eviction, failures, processes.

Everything runs against a real directory. The cross-process tests use fresh
interpreters (``subprocess`` or ``multiprocessing`` with the spawn method).
"""

from __future__ import annotations

import copy
import errno
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
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.chat import promptcache
from rkllm_core.chat.promptcache import (
    FORMAT_VERSION,
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
    return PromptCacheStore(cache_dir)


def put(store: PromptCacheStore, key: CacheKey, data: bytes, **kwargs: Any) -> Path | None:
    staged = store.staging_path(key)
    assert staged is not None
    staged.write_bytes(data)
    return store.commit(key, staged, **kwargs)


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def entry_files(store: PromptCacheStore, key: CacheKey) -> tuple[Path, Path]:
    return store.directory / f"{key.digest}.cache", store.directory / f"{key.digest}.json"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def age(path: Path, seconds: float = STALE_TMP_SECONDS + 60) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


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
    assert list(key.fields) == ["abi", "system", "template"]
    assert key.model == model_identity(model)

    # The scheme itself is pinned: existing cache directories stay valid across releases.
    canonical = json.dumps(
        {
            "scheme": "rkllm-core/prompt-cache",
            "format": 1,
            "model": key.model,
            "fields": {"abi": "1.3", "system": system, "template": template},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert FORMAT_VERSION == 1 and key.digest == hashlib.sha256(canonical.encode()).hexdigest()

    out = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT, str(store.directory), str(model), system, template],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert out.stdout.strip() == key.digest


def test_make_key_differs_for_other_fields_or_model(store: PromptCacheStore, model: Path, other_model: Path) -> None:
    base = store.make_key(model, system="a", abi="1.3")
    assert store.make_key(model, system="b", abi="1.3").digest != base.digest
    assert store.make_key(model, system="a", abi="1.2").digest != base.digest
    assert store.make_key(model, system="a").digest != base.digest
    assert store.make_key(model, system="a", abi="1.3", tools="").digest != base.digest
    assert store.make_key(model, system="a", abi="1.3x").digest != base.digest
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


def test_model_identity(model: Path, tmp_path: Path, store: PromptCacheStore) -> None:
    link = tmp_path / "link.rkllm"
    link.symlink_to(model)
    st = model.stat()
    assert model_identity(link) == f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    for bad in (tmp_path / "missing.rkllm", tmp_path):
        with pytest.raises(CacheError):
            model_identity(bad)
        with pytest.raises(CacheError):
            store.make_key(bad, system="s")


def test_changed_model_misses_and_invalidate_model_removes_its_entries(
    store: PromptCacheStore, model: Path, other_model: Path
) -> None:
    old_a, old_b = store.make_key(model, system="a"), store.make_key(model, system="b")
    other = store.make_key(other_model, system="a")
    for key in (old_a, old_b, other):
        assert put(store, key, key.digest.encode()) is not None

    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "rewritten"
    new_a = store.make_key(model, system="a")
    assert new_a.digest != old_a.digest
    assert store.lookup(new_a) is None
    assert put(store, new_a, b"new") is not None

    assert store.invalidate_model(model) == 3  # every identity of that path
    assert all(store.lookup(k) is None for k in (old_a, old_b, new_a))
    assert store.lookup(other) is not None
    assert store.invalidate_model(model) == 0

    other_model.unlink()  # the file need not exist any more
    assert store.invalidate_model(other_model) == 1
    assert store.entries() == [] and names(store.directory) == set()


# --------------------------------------------------------------------------
# Commit and lookup
# --------------------------------------------------------------------------


def test_commit_lookup_round_trip_and_restart(store: PromptCacheStore, model: Path, cache_dir: Path) -> None:
    key = store.make_key(model, system="sys", template="tpl")
    assert store.lookup(key) is None
    assert store.entries() == [] and store.evict() == 0
    assert not cache_dir.exists()  # a miss creates nothing

    staged = store.staging_path(key)
    assert staged.parent == cache_dir and not staged.exists() and staged.name.startswith(key.digest)
    assert staged.name.endswith(".tmp") and store.staging_path(key) != staged
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    payload = os.urandom(5000)
    staged.write_bytes(payload)
    before = time.time()
    final = store.commit(key, staged, extra={"tokens": 42, "when": object()})

    assert final == cache_dir / f"{key.digest}.cache"
    assert not staged.exists() and final.read_bytes() == payload
    meta = json.loads((cache_dir / f"{key.digest}.json").read_text())
    assert meta["digest"] == key.digest and meta["model"] == key.model and meta["format"] == FORMAT_VERSION
    assert meta["fields"] == {"system": "sys", "template": "tpl"} and meta["size"] == 5000
    assert meta["extra"]["tokens"] == 42 and isinstance(meta["extra"]["when"], str)
    assert names(cache_dir) == {final.name, f"{key.digest}.json"}
    assert store.lookup(key) == final

    restarted = PromptCacheStore(cache_dir)
    assert restarted.lookup(restarted.make_key(model, template="tpl", system="sys")) == final
    [info] = restarted.entries()
    assert info.digest == key.digest and info.path == final and info.size == 5000 and info.model == key.model
    assert dict(info.fields) == {"system": "sys", "template": "tpl"} and info.extra["tokens"] == 42
    assert before - 1 <= info.created <= info.last_used <= time.time() + 1
    assert pickle.loads(pickle.dumps(info)) == info


def test_extra_that_json_cannot_hold(store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = store.make_key(model, system="s")
    assert put(store, key, b"x", extra={"set": {1}, "tuple": (1, 2)}) is not None
    assert dict(store.entries()[0].extra) == {"set": "{1}", "tuple": [1, 2]}
    store.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert put(store, key, b"y", extra={(1, 2): "tuple key"}) is not None
    assert warnings_of(caplog)
    assert "tuple key" in str(store.entries()[0].extra["repr"])


def test_commit_is_write_once(store: PromptCacheStore, model: Path) -> None:
    key = store.make_key(model, system="s")
    first = put(store, key, b"first")
    staged = store.staging_path(key)
    staged.write_bytes(b"second version")
    assert store.commit(key, staged) == first
    assert first is not None and first.read_bytes() == b"first"  # the existing entry is kept
    assert not staged.exists() and len(store.entries()) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "symlink", "too_large"])
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
    elif case == "symlink":
        (store.directory / "elsewhere").write_bytes(b"x" * 10)
        staged.symlink_to(store.directory / "elsewhere")
    elif case == "too_large":
        staged.write_bytes(b"x" * 101)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.commit(key, staged) is None
    assert len(warnings_of(caplog)) == 1
    assert store.lookup(key) is None
    assert case == "directory" or not os.path.lexists(staged)
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
    assert names(store.directory) == {final.name, f"{key.digest}.json"}


def test_discard_never_raises(store: PromptCacheStore, model: Path) -> None:
    key = store.make_key(model, system="s")
    staged = store.staging_path(key)
    staged.write_bytes(b"half written")
    store.discard(staged)
    assert not staged.exists()
    store.discard(staged)  # already gone
    store.discard(store.directory)  # not a file
    assert store.directory.is_dir()


# --------------------------------------------------------------------------
# Invalid entries and crash leftovers
# --------------------------------------------------------------------------


def corrupt_garbage(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    entry_files(store, key)[1].write_bytes(b"\x00{not json at all")


def corrupt_not_an_object(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    entry_files(store, key)[1].write_text("[1, 2]")


def corrupt_other_digest(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    entry_files(store, key)[1].write_bytes(entry_files(store, other)[1].read_bytes())


def corrupt_missing_sidecar(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    entry_files(store, key)[1].unlink()


def corrupt_wrong_size(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    with entry_files(store, key)[0].open("ab") as fh:
        fh.write(b"more")


def edit_meta(store: PromptCacheStore, key: CacheKey, **changes: Any) -> None:
    path = entry_files(store, key)[1]
    meta = json.loads(path.read_text())
    for name, value in changes.items():
        if name == "system":
            meta["fields"]["system"] = value
        else:
            meta[name] = value
    path.write_text(json.dumps(meta))


def corrupt_edited_fields(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    edit_meta(store, key, system="edited")


def corrupt_wrong_format(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    edit_meta(store, key, format=99)


def corrupt_recorded_size(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    edit_meta(store, key, size=1)


def corrupt_symlinked_data(store: PromptCacheStore, key: CacheKey, other: CacheKey) -> None:
    data = entry_files(store, key)[0]
    target = "../" + "e" * (data.stat().st_size - 3)  # the link's own size matches the sidecar's
    (data.parent / target).write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(target)
    assert data.lstat().st_size == json.loads(entry_files(store, key)[1].read_text())["size"]


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_garbage,
        corrupt_not_an_object,
        corrupt_other_digest,
        corrupt_missing_sidecar,
        corrupt_wrong_size,
        corrupt_edited_fields,
        corrupt_wrong_format,
        corrupt_recorded_size,
        corrupt_symlinked_data,
    ],
)
def test_invalid_entry_is_removed_with_one_warning(
    store: PromptCacheStore, model: Path, corrupt: Any, caplog: pytest.LogCaptureFixture
) -> None:
    key, other = store.make_key(model, system="mine"), store.make_key(model, system="theirs")
    assert put(store, key, b"m" * 64) is not None
    assert put(store, other, b"t" * 32) is not None
    corrupt(store, key, other)
    assert [e.digest for e in store.entries()] == [other.digest]  # listed as absent, left alone

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.lookup(key) is None
        assert store.lookup(key) is None  # gone now: a plain miss
    [message] = warnings_of(caplog)
    assert key.digest[:12] in message and "invalid" in message
    assert not any(p.exists() or p.is_symlink() for p in entry_files(store, key))
    assert store.lookup(other) is not None  # the other entry is untouched
    assert put(store, key, b"fresh") is not None  # and the key can be committed again
    assert store.lookup(key) is not None


def test_unreadable_entries_are_misses_and_nothing_raises(
    store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = store.make_key(model, system="s")
    put(store, key, b"data")
    data, meta = entry_files(store, key)
    data.unlink()
    data.mkdir()  # cannot be unlinked as a file
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.lookup(key) is None
        assert store.lookup(key) is None
        store.invalidate(key, "test")
        assert store.evict() >= 0 and store.entries() == []
        store.clear()
    assert data.is_dir()  # never removed as if it were ours
    assert warnings_of(caplog)


def test_sidecar_without_data_is_a_plain_miss(
    store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = store.make_key(model, system="s")
    put(store, key, b"old")
    data, meta = entry_files(store, key)
    data.unlink()  # as a commit in progress looks, between its sidecar and its rename
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.lookup(key) is None
        assert store.evict() == 0
    assert warnings_of(caplog) == [] and meta.exists()  # young: left to its commit
    assert put(store, key, b"new") == data and data.read_bytes() == b"new"
    assert json.loads(meta.read_text())["size"] == 3 and store.lookup(key) == data


CRASH_SCRIPT = """
import os, sys
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith(".cache"):
        os._exit(3)  # dies between the sidecar and the data rename, no cleanup
    real_replace(src, dst)
os.replace = replace
from rkllm_core.chat.promptcache import PromptCacheStore
store = PromptCacheStore(sys.argv[1])
key = store.make_key(sys.argv[2], system="s")
staged = store.staging_path(key)
staged.write_bytes(b"N" * 100)
store.commit(key, staged)
"""


def test_crash_leftovers_and_stale_files_are_removed_by_evict(
    store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = store.make_key(model, system="s")
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(store.directory), str(model)], check=False)
    assert proc.returncode == 3
    data, meta = entry_files(store, key)
    [tmp] = [p for p in store.directory.iterdir() if p.name.endswith(".tmp")]
    assert meta.exists() and not data.exists() and tmp.read_bytes() == b"N" * 100
    assert store.lookup(key) is None

    good = store.make_key(model, system="good")
    broken = store.make_key(model, system="broken")
    put(store, good, b"g" * 10)
    put(store, broken, b"b" * 10)
    entry_files(store, broken)[1].unlink()  # data without sidecar (a lost race)
    fresh_tmp = store.staging_path(good)
    fresh_tmp.write_bytes(b"being written")
    old_lock = store.directory / f"{'a' * 64}.lock"  # from the earlier flock-based store
    old_lock.touch()
    foreign = store.directory / "notes.txt"
    foreign.write_text("not ours")
    for path in (tmp, meta, old_lock, foreign):
        age(path)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.evict() == 1  # the broken entry; leftovers are not counted
    assert any(broken.digest[:12] in m for m in warnings_of(caplog))
    assert names(store.directory) == {
        fresh_tmp.name,
        foreign.name,
        f"{good.digest}.cache",
        f"{good.digest}.json",
    }
    assert store.lookup(good) is not None
    assert put(store, key, b"N" * 100) is not None


# --------------------------------------------------------------------------
# Invalidation and clearing
# --------------------------------------------------------------------------


def test_invalidate_logs_the_reason(store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = store.make_key(model, system="s")
    put(store, key, b"data")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store.invalidate(key, "runtime failed to load it")
    assert any("runtime failed to load it" in m for m in warnings_of(caplog))
    assert store.lookup(key) is None and names(store.directory) == set()
    store.invalidate(key, "again")  # nothing there: no error
    PromptCacheStore(store.directory.parent / "never-created").invalidate(key, "no directory")


def test_clear(store: PromptCacheStore, model: Path) -> None:
    keys = [store.make_key(model, system=str(i)) for i in range(3)]
    for key in keys:
        put(store, key, b"x")
    entry_files(store, keys[0])[0].unlink()  # a sidecar without data goes too
    fresh_tmp = store.staging_path(keys[0])
    fresh_tmp.write_bytes(b"in flight")
    old_tmp = store.staging_path(keys[1])
    old_tmp.write_bytes(b"abandoned")
    age(old_tmp)
    store.clear()
    assert store.entries() == []
    assert names(store.directory) == {fresh_tmp.name}
    assert all(store.lookup(k) is None for k in keys)


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
    assert not (store.directory / f"{keys[2].digest}.json").exists()


def test_lru_eviction_by_bytes_survives_restart(store: PromptCacheStore, model: Path) -> None:
    store.max_bytes = 250
    a, b, c = (store.make_key(model, system=s) for s in "abc")
    put(store, a, b"a" * 100)
    put(store, b, b"b" * 100)
    assert store.lookup(a) is not None
    put(store, c, b"c" * 100)
    assert store.lookup(b) is None
    assert store.lookup(c) is not None and store.lookup(a) is not None  # a is now the newest
    assert sum(e.size for e in store.entries()) == 200

    restarted = PromptCacheStore(store.directory, max_bytes=150)
    assert restarted.evict() == 1
    assert [e.digest for e in restarted.entries()] == [a.digest]


def test_commit_into_a_zero_entry_store(store: PromptCacheStore, model: Path, caplog: pytest.LogCaptureFixture) -> None:
    store.max_entries = 0
    key = store.make_key(model, system="s")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert put(store, key, b"x") is None
    assert warnings_of(caplog) and names(store.directory) == set()


# --------------------------------------------------------------------------
# Disk trouble: logged once, never raised
# --------------------------------------------------------------------------


def test_unusable_directory_is_one_warning_and_no_exception(
    tmp_path: Path, model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = PromptCacheStore(blocker / "cache")
    key = store.make_key(model, system="s")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.staging_path(key) is None  # nowhere to save: the runtime is not asked to
        for _ in range(3):
            elsewhere = tmp_path / "staged.bin"
            elsewhere.write_bytes(b"kv state")
            assert store.commit(key, elsewhere) is None
            assert not elsewhere.exists()  # discarded
        assert store.lookup(key) is None
        assert store.entries() == [] and store.evict() == 0 and store.invalidate_model(model) == 0
        store.invalidate(key, "test")
        store.clear()
    [message] = warnings_of(caplog)
    assert "cannot create prompt cache directory" in message


def test_disk_full_is_one_warning_and_no_exception(
    store: PromptCacheStore, model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = store.make_key(model, system="s")
    real_replace = promptcache._replace

    def full(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    def full_for_data(src: Any, dst: Any) -> None:
        if str(dst).endswith(".cache"):
            full(src, dst)
        real_replace(src, dst)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for fail in (full, full, full_for_data):  # the sidecar fails twice, then the data rename
            staged = store.staging_path(key)
            staged.write_bytes(b"kv state")
            monkeypatch.setattr(promptcache, "_replace", fail)
            try:
                assert store.commit(key, staged) is None
            finally:
                monkeypatch.setattr(promptcache, "_replace", real_replace)
            assert names(store.directory) == set()  # staged file, sidecar and temporaries removed
    [message] = warnings_of(caplog)
    assert "No space left on device" in message

    assert put(store, key, b"kv state") is not None  # the disk has room again
    assert store.lookup(key) is not None


def test_warnings_repeat_after_the_interval(
    store: PromptCacheStore, model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(promptcache, "_WARN_INTERVAL", 0.0)
    key = store.make_key(model, system="s")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            assert store.commit(key, store.staging_path(key)) is None  # nothing was written
    assert len(warnings_of(caplog)) == 2


# --------------------------------------------------------------------------
# Concurrency across processes
# --------------------------------------------------------------------------

KEYS = 4
ROUNDS = 25


def payload(digest: str, worker: int, i: int) -> bytes:
    size = 20_000 + 9_973 * i + 39_193 * worker
    body = f"{digest}|{worker}|{i}|".encode() + random.Random(f"{digest}{worker}{i}").randbytes(size)
    return body + hashlib.sha256(body).digest()


def complete_for(digest: str, data: bytes) -> bool:
    return data.startswith(digest.encode()) and hashlib.sha256(data[:-32]).digest() == data[-32:]


def _writer(directory: str, model: str, worker: int, go: Any, results: Any) -> None:
    try:
        store = PromptCacheStore(directory, max_entries=2)
        keys = [store.make_key(model, system=f"prompt {k}") for k in range(KEYS)]
        go.wait(60)
        committed = 0
        for i in range(ROUNDS):
            key = keys[(i + worker) % KEYS]
            data = payload(key.digest, worker, i)
            staged = store.staging_path(key)
            with open(staged, "wb") as fh:  # written in pieces, as the runtime would
                for start in range(0, len(data), 8192):
                    fh.write(data[start : start + 8192])
            final = store.commit(key, staged)
            assert final in (None, store.directory / f"{key.digest}.cache")
            committed += final is not None
            if i % 7 == worker:
                store.invalidate(key, "test churn")
        results.put(("ok", f"writer {worker}", committed))
    except BaseException:
        results.put(("error", f"writer {worker}", traceback.format_exc()))


def _reader(directory: str, model: str, worker: int, go: Any, done: Any, results: Any) -> None:
    try:
        store = PromptCacheStore(directory, max_entries=2)
        keys = [store.make_key(model, system=f"prompt {k}") for k in range(KEYS)]
        go.wait(60)
        hits = misses = 0
        bad: list[str] = []
        deadline = time.monotonic() + 90
        for n in range(1_000_000):
            if time.monotonic() > deadline:
                break
            finished = done.is_set()
            for key in keys:
                path = store.lookup(key)
                try:
                    data = path.read_bytes() if path is not None else None
                except FileNotFoundError:  # evicted between lookup and read: the runtime would miss too
                    data = None
                if data is None:
                    misses += 1
                elif complete_for(key.digest, data):
                    hits += 1
                else:
                    bad.append(f"lookup {key.digest[:12]}: {len(data)} bytes starting {data[:20]!r}")
                try:  # no lookup at all: a file at the final name is always complete
                    raw = (store.directory / f"{key.digest}.cache").read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    raw = None
                if raw is not None and not complete_for(key.digest, raw):
                    bad.append(f"raw {key.digest[:12]}: {len(raw)} bytes starting {raw[:20]!r}")
            if n % 3 == worker:
                store.evict()  # concurrent evictions
            store.entries()
            if finished:
                break
        results.put(("ok", f"reader {worker}", (hits, misses, bad)))
    except BaseException:
        results.put(("error", f"reader {worker}", traceback.format_exc()))


@pytest.mark.slow
def test_concurrent_commits_and_lookups_across_processes(cache_dir: Path, model: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    go, done, results = ctx.Barrier(5), ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(cache_dir), str(model), w, go, results)) for w in range(3)]
    readers = [ctx.Process(target=_reader, args=(str(cache_dir), str(model), r, go, done, results)) for r in range(2)]
    procs = [*writers, *readers]
    for p in procs:
        p.start()
    reports: dict[str, Any] = {}
    try:
        while len(reports) < len(writers):
            status, who, detail = results.get(timeout=120)
            assert status == "ok", f"{who} failed:\n{detail}"
            reports[who] = detail
        done.set()
        while len(reports) < len(procs):
            status, who, detail = results.get(timeout=120)
            assert status == "ok", f"{who} failed:\n{detail}"
            reports[who] = detail
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

    assert sum(reports[f"writer {w}"] for w in range(3)) > 0
    for r in range(2):
        hits, misses, bad = reports[f"reader {r}"]
        assert bad == [], "a lookup returned a file that is not one complete payload of its key"
        assert hits + misses > 0
    assert sum(reports[f"reader {r}"][0] for r in range(2)) >= 1

    store = PromptCacheStore(cache_dir, max_entries=2)
    store.evict()
    left = store.entries()
    assert len(left) <= 2
    for info in left:
        assert complete_for(info.digest, info.path.read_bytes())
    assert not [n for n in names(cache_dir) if n.endswith(".tmp")]
    assert {n.split(".")[0] for n in names(cache_dir)} == {info.digest for info in left}


# --------------------------------------------------------------------------
# Configuration and arguments
# --------------------------------------------------------------------------


def test_default_directory_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = PromptCacheStore()
    assert store.directory == tmp_path / "explicit" and not store.directory.exists()

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


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": -1}, {"max_entries": -1}, {"max_entries": 1.5}, {"max_bytes": True}, {"directory": 3}],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], tmp_path: Path) -> None:
    kwargs.setdefault("directory", tmp_path)
    with pytest.raises(InvalidParameterError):
        PromptCacheStore(**kwargs)


def test_lock_timeout_is_gone(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        PromptCacheStore(tmp_path, lock_timeout=5.0)  # type: ignore[call-arg]
    assert not hasattr(PromptCacheStore, "reading")


def test_malformed_digest_is_rejected(store: PromptCacheStore, model: Path, tmp_path: Path) -> None:
    key = store.make_key(model, system="s")
    object.__setattr__(key, "digest", "../../etc/passwd")
    staged = tmp_path / "staged"
    staged.write_bytes(b"x")
    for call in (
        lambda: store.lookup(key),
        lambda: store.staging_path(key),
        lambda: store.commit(key, staged),
        lambda: store.invalidate(key, "x"),
        lambda: store.lookup("not a key"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidParameterError):
            call()
    assert not store.directory.exists() and staged.exists()


@pytest.mark.parametrize("size", [1000, 400 * 1024], ids=["small", "larger-than-the-head"])
def test_a_file_swapped_or_corrupted_in_place_is_never_handed_out(
    store: PromptCacheStore, model: Path, other_model: Path, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    mine, theirs = store.make_key(model, system="mine"), store.make_key(other_model, system="theirs")
    assert put(store, mine, b"A" * size) is not None and put(store, theirs, b"B" * size) is not None
    mine_data, _ = entry_files(store, mine)
    theirs_data, _ = entry_files(store, theirs)
    mine_data.write_bytes(theirs_data.read_bytes())  # another model's file, same size: size checks pass
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.lookup(mine) is None
    assert any("swapped or corrupted" in m for m in warnings_of(caplog)) and not mine_data.exists()
    assert store.lookup(theirs) == theirs_data  # the other entry is untouched
    data = bytearray(theirs_data.read_bytes())
    data[-1] ^= 0xFF  # one byte changed at the end, same size
    theirs_data.write_bytes(bytes(data))
    assert store.lookup(theirs) is None


def test_an_entry_without_a_content_fingerprint_is_rebuilt(store: PromptCacheStore, model: Path) -> None:
    key = store.make_key(model, system="s")
    assert put(store, key, b"kv state") is not None
    data, meta = entry_files(store, key)
    doc = json.loads(meta.read_text())
    del doc["content"]  # a sidecar written before files were bound to their content
    meta.write_text(json.dumps(doc))
    assert store.lookup(key) is None and not data.exists()
