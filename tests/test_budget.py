"""The default budget (as many models as fit), its overrides, the swap warning and load notices."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core import ModelManager, set_default_manager
from rkllm_core.errors import InvalidParameterError
from rkllm_core.models.budget import SwapWatch, resolve_budget
from rkllm_core.models.manager import LoadEvent, default_manager
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model

CHAT_FILE = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
EMBED_FILE = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"


def meminfo(tmp_path: Path, available_kb: int | None) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    lines = ["MemTotal:       16000000 kB"]
    if available_kb is not None:
        lines.append(f"MemAvailable:   {available_kb} kB")
    (root / "proc" / "meminfo").write_text("\n".join(lines) + "\n")
    return root


# -- resolve_budget: pure ----------------------------------------------------------------------------------
def test_auto_budget_is_what_fits_in_available_memory(tmp_path: Path) -> None:
    root = meminfo(tmp_path, 8 * 1024 * 1024)  # 8 GB available
    budget = resolve_budget("auto", "auto", environ={}, root=root)
    assert budget.max_loaded is None
    assert budget.memory_budget_mb == pytest.approx((8192 - 128) / 1.1)
    # the same rule as the pre-flight check: one model of exactly that size needs all that is available
    from rkllm_core import preflight

    assert preflight.memory_needed_mb(int(budget.memory_budget_mb * 1024 * 1024)) == pytest.approx(8192)
    assert "memory" in budget.describe()


def test_unknown_memory_keeps_two_models(tmp_path: Path) -> None:
    budget = resolve_budget("auto", "auto", environ={}, root=meminfo(tmp_path, None))
    assert (budget.max_loaded, budget.memory_budget_mb) == (2, None)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RKLLM_MAX_LOADED": "3"}, (3, None)),
        ({"RKLLM_MAX_LOADED": "none"}, (None, None)),
        ({"RKLLM_MEMORY_BUDGET_MB": "2500"}, (None, 2500.0)),
        ({"RKLLM_MAX_LOADED": "1", "RKLLM_MEMORY_BUDGET_MB": "900.5"}, (1, 900.5)),
    ],
)
def test_environment_overrides_the_memory_estimate(
    tmp_path: Path, env: dict[str, str], expected: tuple[int | None, float | None]
) -> None:
    budget = resolve_budget("auto", "auto", environ=env, root=meminfo(tmp_path, 4 * 1024 * 1024))
    assert (budget.max_loaded, budget.memory_budget_mb) == expected
    assert all(name in budget.source for name in env)


@pytest.mark.parametrize(
    "env",
    [
        {"RKLLM_MAX_LOADED": "0"},
        {"RKLLM_MAX_LOADED": "two"},
        {"RKLLM_MEMORY_BUDGET_MB": "-5"},
        {"RKLLM_MEMORY_BUDGET_MB": "lots"},
        {"RKLLM_MEMORY_BUDGET_MB": "nan"},
    ],
)
def test_a_bad_environment_value_is_a_clear_error(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(InvalidParameterError, match=next(iter(env))):
        resolve_budget("auto", "auto", environ=env, root=meminfo(tmp_path, 1024 * 1024))


def test_explicit_arguments_win_over_environment_and_memory(tmp_path: Path) -> None:
    root = meminfo(tmp_path, 8 * 1024 * 1024)
    env = {"RKLLM_MAX_LOADED": "5", "RKLLM_MEMORY_BUDGET_MB": "100"}
    budget = resolve_budget(1, None, environ=env, root=root)
    assert (budget.max_loaded, budget.memory_budget_mb) == (1, None)
    # a count alone: no memory budget is invented beside it (the behaviour of ModelManager(max_loaded=1))
    budget = resolve_budget(1, "auto", environ={}, root=root)
    assert (budget.max_loaded, budget.memory_budget_mb) == (1, None)


def test_manager_reports_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_MAX_LOADED", "4")
    monkeypatch.delenv("RKLLM_MEMORY_BUDGET_MB", raising=False)
    m = ModelManager()
    assert (m.max_loaded, m.memory_budget_mb) == (4, None)
    assert ModelManager(max_loaded=1).max_loaded == 1
    with pytest.raises(InvalidParameterError):
        ModelManager(max_loaded=0)
    with pytest.raises(InvalidParameterError):
        ModelManager(memory_budget_mb="lots")  # type: ignore[arg-type]


# -- SwapWatch: pure ---------------------------------------------------------------------------------------
def test_swap_watch_names_models_that_keep_swapping_at_most_once_a_window() -> None:
    watch = SwapWatch(window_s=60, warn_after=3)
    messages = []
    t = 0.0
    for i in range(12):  # a and b take turns, each unloaded to make room for the other
        name, other = ("a", "b") if i % 2 == 0 else ("b", "a")
        watch.evicted(other, t)
        messages.append(watch.loaded(name, t + 0.5))
        t += 1.0
    said = [m for m in messages if m]
    assert len(said) == 1 and "a, b" in said[0] and "RKLLM_MAX_LOADED" in said[0]
    t += 61
    for name, other in (("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")):
        watch.evicted(other, t)
        said.append(watch.loaded(name, t + 0.5) or "")
        t += 1
    assert sum(1 for m in said if m) == 2  # a window later it may speak again


def test_swap_watch_is_quiet_for_loads_far_apart() -> None:
    watch = SwapWatch(window_s=60, warn_after=3)
    t = 0.0
    for _ in range(10):
        watch.evicted("a", t)
        assert watch.loaded("a", t + 61) is None  # reloaded, but more than a window later
        t += 200
    assert watch.loaded("never-evicted", t) is None


# -- the default manager on the simulator ------------------------------------------------------------------
@pytest.fixture
def app_env(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl
) -> Iterator[SimulatorControl]:
    make_model(model_dir, CHAT_FILE)
    make_model(model_dir, EMBED_FILE)
    monkeypatch.setenv("RKLLM_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("RKLLM_LIB_PATH", str(sim_lib.path))
    for name in ("RKLLM_MAX_LOADED", "RKLLM_MEMORY_BUDGET_MB"):
        monkeypatch.delenv(name, raising=False)
    previous = set_default_manager(None)
    yield sim
    made = set_default_manager(previous)
    if made is not None:
        made.close()


def run_app(calls: int) -> None:
    """An app as the LangChain docs write one: a chat model and an embedding model, no manager in sight."""
    pytest.importorskip("langchain_core")
    from langchain_rkllm import ChatRKLLM, RKLLMEmbeddings

    llm = ChatRKLLM(model="qwen3-0.6b", max_tokens=8)
    embeddings = RKLLMEmbeddings(model="qwen3-embedding-0.6b")
    for i in range(calls):
        embeddings.embed_query(f"question {i}")
        llm.invoke(f"question {i}")


def test_a_chat_and_an_embedding_model_stay_loaded_under_the_default_manager(app_env: SimulatorControl) -> None:
    run_app(6)
    assert app_env.counter("inits") == 2
    assert len(default_manager().loaded()) == 2


def test_a_tight_budget_swaps_and_says_so(
    app_env: SimulatorControl, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RKLLM_MAX_LOADED", "1")
    with caplog.at_level(logging.WARNING, logger="rkllm_core.models.manager"):
        run_app(6)
    assert app_env.counter("inits") == 12
    warnings = [r.getMessage() for r in caplog.records if "keep swapping" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "qwen3-0.6b" in warnings[0] and "qwen3-embedding-0.6b" in warnings[0]


def test_load_listeners_hear_start_and_end(app_env: SimulatorControl) -> None:
    manager = ModelManager(max_loaded=1)
    events: list[LoadEvent] = []
    stop = manager.on_load(events.append)

    def bad(event: LoadEvent) -> None:
        raise RuntimeError("a listener's bug")

    manager.on_load(bad)  # logged and ignored: the load goes on
    try:
        with manager.lease("qwen3-0.6b"):
            pass
        stop()
        with manager.lease("qwen3-embedding-0.6b"):
            pass
    finally:
        manager.close()
    assert [(e.name, e.phase) for e in events] == [("qwen3-0.6b", "start"), ("qwen3-0.6b", "done")]
    assert events[0].size_mb > 0 and events[1].seconds is not None and events[1].seconds >= 0


def test_load_listeners_hear_a_failure(app_env: SimulatorControl, model_dir: Path) -> None:
    (model_dir / "Qwen3-1.7B-rk3588-w8a8.rkllm").write_bytes(b"not a model at all")
    manager = ModelManager()
    events: list[LoadEvent] = []
    manager.on_load(events.append)
    try:
        with pytest.raises(Exception), manager.lease("qwen3-1.7b"):  # noqa: B017 (whatever the file error is)
            pass
    finally:
        manager.close()
    assert [e.phase for e in events] == ["start", "failed"] and events[1].error is not None


# -- keep-alive: models unused for a while are unloaded ----------------------------------------------------
def wait_until(predicate: Callable[[], bool], limit_s: float = 20.0) -> bool:
    """Poll ``predicate`` until true; the limit only bounds a failing test, it is no timing margin."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_model_unused_past_its_keep_alive_is_unloaded(app_env: SimulatorControl) -> None:
    manager = ModelManager(keep_alive=0.05)
    try:
        with manager.lease("qwen3-0.6b"):
            pass
        assert wait_until(lambda: not manager.is_loaded("qwen3-0.6b"))
        assert wait_until(lambda: app_env.counter("resident_handles") == 0)
        with manager.lease("qwen3-0.6b"):  # and it comes back when asked for
            assert manager.is_loaded("qwen3-0.6b")
    finally:
        manager.close()
    assert manager._reaper is not None
    manager._reaper.join(10)
    assert not manager._reaper.is_alive(), "the keep-alive thread outlived its manager"


def test_keep_alive_per_model_and_zero_unloads_when_idle(app_env: SimulatorControl) -> None:
    manager = ModelManager()
    try:
        with manager.lease("qwen3-0.6b"), manager.lease("qwen3-embedding-0.6b"):
            assert manager.expires_at("qwen3-0.6b") is None  # default: no expiry
            manager.keep_alive("qwen3-0.6b", 0)
            # in use: never expired, whatever the clock says
            assert manager._expired(time.monotonic() + 3600)[0] == []
        assert wait_until(lambda: not manager.is_loaded("qwen3-0.6b"))
        assert manager.is_loaded("qwen3-embedding-0.6b")  # the other has no keep-alive
        manager.keep_alive("qwen3-embedding-0.6b", 300)
        expires = manager.expires_at("qwen3-embedding-0.6b")
        assert expires is not None and 200 < expires - time.time() <= 300
        manager.keep_alive("qwen3-embedding-0.6b", -1)
        assert manager.expires_at("qwen3-embedding-0.6b") is None
    finally:
        manager.close()


def test_the_simulator_keeps_two_models_whatever_the_hosts_memory(
    app_env: SimulatorControl, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_dir: Path
) -> None:
    from rkllm_core import preflight

    make_model(model_dir, CHAT_FILE, size_mb=890)  # sparse, as rkllm demo makes them
    make_model(model_dir, EMBED_FILE, size_mb=640)
    monkeypatch.setattr(preflight, "SYSTEM_ROOT", str(meminfo(tmp_path, 300 * 1024)))  # 300 MB available
    manager = ModelManager()
    assert manager.budget.from_memory and manager.memory_budget_mb is not None
    assert manager.memory_budget_mb < 200  # less than either (sparse) demo file claims to be
    try:
        for _ in range(3):
            for name in ("qwen3-0.6b", "qwen3-embedding-0.6b"):
                with manager.lease(name):
                    pass
        assert app_env.counter("inits") == 2
    finally:
        manager.close()
