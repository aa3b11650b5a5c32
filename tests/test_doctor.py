"""``rkllm doctor`` on the simulator: every step passes; failures are reported, not raised."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_core import preflight
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native import structs
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model
from rkllm_core.tools.doctor import check_layouts, format_report, run_doctor
from tests.test_preflight import make_tree


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake RK3576 board tree (vendor NPU driver, enough memory) for the pre-flight lines."""
    root = make_tree(tmp_path / "board")
    monkeypatch.setattr(preflight, "SYSTEM_ROOT", str(root))
    return root


def test_all_steps_pass_on_the_simulator(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, board: Path
) -> None:
    sim.set("token_delay_ms", 0.2)
    make_model(model_dir, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
    make_model(model_dir, "gemma-3-1b-it_w8a8.rkllm")
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=1) as m:
        results = run_doctor(m)
    assert [(r.name, r.status) for r in results] == [
        ("struct layouts", "PASS"),
        ("runtime library and ABI", "PASS"),
        ("models", "PASS"),
        ("pre-flight: memory", "PASS"),
        ("pre-flight: npu driver", "PASS"),
        ("pre-flight: cpu", "PASS"),
        ("init", "PASS"),
        ("stream", "PASS"),
        ("abort mid-stream", "PASS"),
        ("swap between two models", "PASS"),
        ("prompt cache save and load", "PASS"),
    ], format_report(results)
    assert sim.counter("aborts") == 1 and sim.counter("prompt_cache_saves") == 1 and sim.counter("destroys") >= 2


def test_one_model_skips_the_swap(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, board: Path) -> None:
    make_model(model_dir)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        results = {r.name: r for r in run_doctor(m)}
    assert results["swap between two models"].status == "SKIP"
    assert "result: all 11 checks OK" in format_report(list(results.values()))


def test_pre_flight_problems_and_assumptions_are_reported(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_model(model_dir)
    root = make_tree(tmp_path / "mainline", rknpu=None, rknpu_module=False, rocket=True, soc="rk3588")
    monkeypatch.setattr(preflight, "SYSTEM_ROOT", str(root))
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        results = {r.name: r for r in run_doctor(m)}
    assert results["pre-flight: npu driver"].status == "FAIL" and "rocket" in results["pre-flight: npu driver"].detail
    assert "not applied when loading" in results["pre-flight: npu driver"].detail  # the simulator
    assert "verified: simulator marker" in results["runtime library and ABI"].detail


def test_a_broken_model_fails_its_step(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path) -> None:
    (model_dir / "broken-ctx4096.rkllm").write_bytes(b"not a model")
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        results = run_doctor(m, ["broken"])
    init = next(r for r in results if r.name == "init")
    assert init.status == "FAIL" and "InitError" in init.detail
    assert "FAILED" in format_report(results)


def test_layout_mismatch_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "structs match" in check_layouts()
    patched = {abi: {w: dict(v) for w, v in by.items()} for abi, by in structs.HEADER_SIZES.items()}
    patched["1.3"][8]["RKLLMParam"] = 999
    patched["1.3"][4]["RKLLMParam"] = 999
    monkeypatch.setattr(structs, "HEADER_SIZES", patched)
    with pytest.raises(AssertionError, match="RKLLMParam"):
        check_layouts()


def test_cli_doctor_on_the_simulator(sim_paths: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools.cli", "doctor", "--lib", str(sim_paths["1.2"])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result: all 11 checks OK" in proc.stdout and "SIMULATOR" in proc.stdout


def test_cli_doctor_without_library(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools.cli", "doctor", "--lib", str(tmp_path / "missing.so")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "[FAIL] runtime library and ABI" in proc.stdout and "Traceback" not in proc.stderr
