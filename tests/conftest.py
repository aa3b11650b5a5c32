"""Shared fixtures: the simulator built for each ABI, model files, runtimes."""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rkllm_core.native.library import RuntimeLibrary, load_library
from rkllm_core.params import InitParams
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.sim import SimulatorControl, build_simulator, make_model

HAVE_CC = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler to build the simulator")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def _private_prompt_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep every prompt-cache file the tests write out of the user's cache directory."""
    old = os.environ.get("RKLLM_PROMPT_CACHE_DIR")
    os.environ["RKLLM_PROMPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("prompt-cache"))
    yield
    if old is None:
        os.environ.pop("RKLLM_PROMPT_CACHE_DIR", None)
    else:
        os.environ["RKLLM_PROMPT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("simcache")


@pytest.fixture(scope="session")
def sim_paths(sim_cache: Path) -> dict[str, Path]:
    if not HAVE_CC:
        pytest.skip("no C compiler to build the simulator")
    return {abi: build_simulator(abi, cache_dir=sim_cache) for abi in ("1.2", "1.3")}


@pytest.fixture(params=["1.2", "1.3"], ids=["abi12", "abi13"])
def abi(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sim_lib(sim_paths: dict[str, Path], abi: str) -> RuntimeLibrary:
    return load_library(sim_paths[abi])


@pytest.fixture
def sim(sim_lib: RuntimeLibrary) -> Iterator[SimulatorControl]:
    """Simulator control with fresh counters and default settings; checks for leaked handles."""
    ctl = SimulatorControl(sim_lib.path)
    defaults = {
        "token_delay_ms": 0,
        "prefill_ms_per_token": 0,
        "init_delay_ms": 0,
        "destroy_delay_ms": 0,
        "error_after_tokens": -1,
        "finish_after_abort": 0,
        "waiting_text": 0,
        "split_utf8_normal": 0,
        "trace": 0,
        "banner": 0,
    }
    for key, value in defaults.items():
        ctl.set(key, value)
    ctl.clear_trace()
    ctl.reset()
    live_before = ctl.counter("live_handles")
    resident_before = ctl.counter("resident_handles")
    yield ctl
    gc.collect()
    assert ctl.counter("invalid_handle_calls") == 0, "native code saw an invalid handle"
    assert ctl.counter("concurrent_run_violations") == 0, "two runs overlapped on one handle"
    assert ctl.counter("destroy_while_running") == 0, "a running handle was destroyed"
    assert ctl.counter("live_handles") == live_before, "a test leaked a runtime handle"
    assert ctl.counter("resident_handles") == resident_before, "a model stayed in (simulated) memory"
    for key, value in defaults.items():
        ctl.set(key, value)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture
def model_path(model_dir: Path) -> Path:
    return make_model(model_dir)


@pytest.fixture
def runtime_factory(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_path: Path
) -> Iterator[Callable[..., RKLLMRuntime]]:
    made: list[RKLLMRuntime] = []

    def factory(path: Path | None = None, params: InitParams | None = None) -> RKLLMRuntime:
        rt = RKLLMRuntime(path or model_path, params=params, library=sim_lib)
        made.append(rt)
        return rt

    yield factory
    for rt in made:
        rt.close()


@pytest.fixture
def runtime(runtime_factory: Callable[..., RKLLMRuntime]) -> RKLLMRuntime:
    return runtime_factory()
