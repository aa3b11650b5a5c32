"""Fixtures for the librknnrt simulator: its build, its counters with leak checks, encoder files."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_core.native.rknn import RKNNLibrary, load_rknn_library
from rkllm_core.sim import RKNNSimulatorControl, build_rknn_simulator
from tests.conftest import HAVE_CC

SETTINGS = {"run_delay_ms": 0, "fail_core_mask": 0, "fail_run": 0, "fail_outputs_get": 0}
VIOLATIONS = (
    "struct_size_violations",
    "input_violations",
    "output_violations",
    "invalid_context_calls",
    "concurrent_run_violations",
    "destroy_while_running",
    "outputs_leaked_at_destroy",
)


@pytest.fixture(scope="session")
def rknn_sim_path(sim_cache: Path) -> Path:
    if not HAVE_CC:
        pytest.skip("no C compiler to build the simulator")
    return build_rknn_simulator(cache_dir=sim_cache)


@pytest.fixture
def rknn_lib(rknn_sim_path: Path) -> RKNNLibrary:
    return load_rknn_library(rknn_sim_path)


@pytest.fixture
def rknn_sim(rknn_lib: RKNNLibrary) -> Iterator[RKNNSimulatorControl]:
    """Simulator control with fresh counters; fails the test on a leaked context or output, or a violation."""
    ctl = RKNNSimulatorControl(rknn_lib.path)
    for key, value in SETTINGS.items():
        ctl.set(key, value)
    ctl.reset()
    live_before = ctl.counter("live_contexts")
    outstanding_before = ctl.counter("outputs_outstanding")
    yield ctl
    gc.collect()
    for key, value in SETTINGS.items():
        ctl.set(key, value)
    counters = ctl.counters()
    assert {k: counters[k] for k in VIOLATIONS} == dict.fromkeys(VIOLATIONS, 0), "the RKNN contract was broken"
    assert counters["live_contexts"] == live_before, "a test leaked an rknn_context"
    assert counters["outputs_outstanding"] == outstanding_before, "a test left outputs unreleased"
