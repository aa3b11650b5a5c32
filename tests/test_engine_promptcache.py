"""System-prompt prefill cached on disk, across process restarts, with the simulator's counters."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_core.chat import promptcache
from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.promptcache import PromptCacheStore
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

SYSTEM = " ".join(f"Rule {i}: always answer politely and cite the manual section {i}." for i in range(70))

# One request in a fresh interpreter; prints usage and the simulator counters as JSON.
CHILD = r"""
import json, sys
from rkllm_core.chat.engine import ChatEngine
from rkllm_core.models.manager import ModelManager
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.promptcache import PromptCacheStore
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.sim import SimulatorControl
lib, models, cache, system, question = sys.argv[1:6]
sim = SimulatorControl(lib); sim.set("banner", 0)
with ModelManager(ModelRegistry([models], platform=None), library=lib) as m:
    engine = ChatEngine(m, prompt_cache=PromptCacheStore(cache))
    r = engine.chat("qwen3-0.6b", [ChatMessage("system", system), ChatMessage("user", question)])
    print(json.dumps({"text": r.message.content, "prefilled": r.usage.prefilled_tokens,
                      "input": r.usage.input_tokens, **sim.counters()}))
"""


def run_child(lib: Path, models: Path, cache: Path, question: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(lib), str(models), str(cache), SYSTEM, question],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_system_prompt_prefill_survives_a_restart(sim_paths: dict[str, Path], model_dir: Path, tmp_path: Path) -> None:
    make_model(model_dir)
    cache = tmp_path / "pcache"
    first = run_child(sim_paths["1.3"], model_dir, cache, "first question")
    assert first["prompt_cache_saves"] == 1 and first["prompt_cache_hit_tokens"] == 0
    second = run_child(sim_paths["1.3"], model_dir, cache, "a different question")
    assert second["text"] == "Echo: a different question — ok."
    assert second["prompt_cache_loads"] == 1
    system_tokens = int(first["prefilled"]) - 20  # the first run prefilled the system prompt plus a short turn
    assert int(second["prompt_cache_hit_tokens"]) >= 0.9 * system_tokens, (first, second)
    assert int(second["prefilled"]) < 0.1 * int(first["prefilled"])


def test_two_processes_share_the_cache_dir(sim_paths: dict[str, Path], model_dir: Path, tmp_path: Path) -> None:
    make_model(model_dir)
    cache = tmp_path / "pcache"
    cmd = [sys.executable, "-c", CHILD, str(sim_paths["1.3"]), str(model_dir), str(cache), SYSTEM]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([*cmd, f"q{i}"], stdout=subprocess.PIPE, text=True, env=env) for i in range(4)]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        assert json.loads(out.strip().splitlines()[-1])["text"].startswith("Echo: q")
    store = PromptCacheStore(cache)
    entries = store.entries()
    assert len(entries) == 1 and entries[0].size > 0
    assert not list(cache.glob("*.tmp"))
    # and it is usable: a fresh process loads it
    assert run_child(sim_paths["1.3"], model_dir, cache, "later")["prompt_cache_loads"] == 1


def test_corrupt_cache_file_is_rebuilt_with_a_warning(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_model(model_dir)
    store = PromptCacheStore(tmp_path / "pcache")
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        ChatEngine(m, prompt_cache=store).chat("qwen3-0.6b", [ChatMessage("system", SYSTEM), ChatMessage("user", "a")])
    [entry] = store.entries()
    # Same size, so size checks pass: the content fingerprint catches it before the runtime sees it.
    entry.path.write_bytes(b"x" * entry.size)
    with (
        caplog.at_level(logging.WARNING),
        ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m,
    ):
        reply = ChatEngine(m, prompt_cache=store).chat(
            "qwen3-0.6b", [ChatMessage("system", SYSTEM), ChatMessage("user", "b")]
        )
    assert reply.message.content == "Echo: b — ok."
    assert any("swapped or corrupted" in r.getMessage() for r in caplog.records)
    assert sim.counter("prompt_cache_loads") == 0  # never handed to the runtime
    assert sim.counter("prompt_cache_saves") == 2  # rebuilt
    [entry] = store.entries()
    assert entry.path.read_bytes().startswith(b"RKLLMSIM-PCACHE")


def test_changed_model_file_misses(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path
) -> None:
    path = make_model(model_dir)
    store = PromptCacheStore(tmp_path / "pcache")
    msgs = [ChatMessage("system", SYSTEM), ChatMessage("user", "a")]
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        ChatEngine(m, prompt_cache=store).chat("qwen3-0.6b", msgs)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        ChatEngine(m, prompt_cache=store).chat("qwen3-0.6b", msgs)
    assert sim.counter("prompt_cache_loads") == 0 and sim.counter("prompt_cache_saves") == 2


def test_short_system_prompts_are_not_cached(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path
) -> None:
    make_model(model_dir)
    store = PromptCacheStore(tmp_path / "pcache")
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        ChatEngine(m, prompt_cache=store).chat(
            "qwen3-0.6b", [ChatMessage("system", "Be brief."), ChatMessage("user", "a")]
        )
    assert store.entries() == [] and sim.counter("prompt_cache_saves") == 0


# -- faults: the prompt cache is an optimisation, so every fault degrades to a miss ------------------------------


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache directory on a disk that is full: a 64 KiB tmpfs where we may mount one, else ENOSPC on commit."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount_point)],
            capture_output=True,
            check=False,
        )
        mounted = result.returncode == 0
    if mounted:
        (mount_point / "filler").write_bytes(b"\0" * 60 * 1024)  # what is left does not hold a cache file
    else:

        def no_space(src: object, dst: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

        monkeypatch.setattr(promptcache, "_replace", no_space)
    yield mount_point / "pcache"
    if mounted:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_never_fails_a_request(
    sim_lib: RuntimeLibrary,
    sim: SimulatorControl,
    model_dir: Path,
    full_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_model(model_dir)
    store = PromptCacheStore(full_disk)
    registry = ModelRegistry([model_dir], platform=None)
    with caplog.at_level(logging.WARNING), ModelManager(registry, library=sim_lib) as m:
        engine = ChatEngine(m, prompt_cache=store)
        for i in range(4):
            system = f"{SYSTEM} Variant {i}."  # a fresh conversation each time: each tries to save
            reply = engine.chat("qwen3-0.6b", [ChatMessage("system", system), ChatMessage("user", f"q{i}")])
            assert reply.message.content == f"Echo: q{i} — ok."
    assert store.entries() == []
    assert sum(r.levelno == logging.WARNING and "prompt cache" in r.getMessage() for r in caplog.records) <= 2


def test_an_unusable_cache_directory_is_skipped(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path
) -> None:
    make_model(model_dir)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        engine = ChatEngine(m, prompt_cache=PromptCacheStore(blocker / "pcache"))
        reply = engine.chat("qwen3-0.6b", [ChatMessage("system", SYSTEM), ChatMessage("user", "q")])
    assert reply.message.content == "Echo: q — ok."
    assert sim.counter("prompt_cache_saves") == 0  # the runtime was not asked to write where it cannot


def test_a_model_file_that_cannot_be_examined_skips_the_cache(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path
) -> None:
    path = make_model(model_dir)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        engine = ChatEngine(m, prompt_cache=PromptCacheStore(tmp_path / "pcache"))
        engine.chat("qwen3-0.6b", [ChatMessage("user", "load it")])
        path.unlink()  # replaced on disk while loaded (the runtime has read it already)
        reply = engine.chat("qwen3-0.6b", [ChatMessage("system", SYSTEM), ChatMessage("user", "q")])
    assert reply.message.content == "Echo: q — ok." and sim.counter("prompt_cache_saves") == 0


def test_cache_files_corrupted_and_swapped_between_runs_are_misses(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path
) -> None:
    make_model(model_dir)
    store = PromptCacheStore(tmp_path / "pcache")
    systems = [f"{SYSTEM} Persona {c}." for c in "AB"]  # same length: same-size cache files

    def ask(system: str, question: str) -> None:
        with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
            reply = ChatEngine(m, prompt_cache=store).chat(
                "qwen3-0.6b", [ChatMessage("system", system), ChatMessage("user", question)]
            )
        assert reply.message.content == f"Echo: {question} — ok."

    for system in systems:
        ask(system, "make the entry")
    a, b = sorted(store.entries(), key=lambda e: e.fields["setup"].endswith("Persona B."))
    assert a.size == b.size and sim.counter("prompt_cache_saves") == 2
    a.path.write_bytes(b.path.read_bytes())  # B's file swapped in for A
    ask(systems[0], "after the swap")
    b.path.write_bytes(b"\xff" * b.size)  # B corrupted in place
    ask(systems[1], "after the corruption")
    assert sim.counter("prompt_cache_loads") == 0  # neither bad file reached the runtime
    assert sim.counter("prompt_cache_saves") == 4  # both rebuilt
    ask(systems[0], "and now")
    assert sim.counter("prompt_cache_loads") == 1  # the rebuilt entry is good
