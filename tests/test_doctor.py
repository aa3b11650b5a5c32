"""``rkllm doctor`` on the simulator: every step passes; failures are reported, not raised."""

from __future__ import annotations

import os
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


def test_embedding_and_reranker_models_get_their_own_step(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, board: Path
) -> None:
    make_model(model_dir, "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm")  # sorts first: not the chat model
    make_model(model_dir, "gemma-3-1b-it_w8a8.rkllm")
    make_model(model_dir, "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm", yes_token=9693, no_token=2152)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=1) as m:
        results = {r.name: r for r in run_doctor(m)}
    assert results["models"].detail.startswith("using gemma3-1b")
    assert results["stream"].status == "PASS" and results["init"].status == "PASS"
    assert results["embedding (qwen3-embedding-0.6b)"].status == "PASS", format_report(list(results.values()))
    assert "256 dimensions" in results["embedding (qwen3-embedding-0.6b)"].detail
    assert results["reranking (qwen3-reranker-0.6b)"].status == "PASS"
    assert not any(r.status == "FAIL" for r in results.values()), format_report(list(results.values()))


def test_only_an_embedding_model_skips_the_generation_steps_with_the_reason(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, board: Path
) -> None:
    make_model(model_dir, "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm")
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as m:
        results = run_doctor(m, ["qwen3-embedding-0.6b"])
    names = [r.name for r in results]
    assert "stream" not in names and "init" not in names
    [skipped] = [r for r in results if r.status == "SKIP" and "no chat model" in r.detail]
    assert "qwen3-embedding-0.6b (embedding)" in skipped.detail
    assert [r.status for r in results if r.name.startswith("embedding")] == ["PASS"]
    assert "FAILED" not in format_report(results)


def test_cli_doctor_cleans_up_and_respects_rkllm_model_dir(sim_paths: dict[str, Path], tmp_path: Path) -> None:
    scratch, models = tmp_path / "scratch", tmp_path / "models"
    scratch.mkdir()
    make_model(models, "Llama-3.2-1B-Instruct-w8a8.rkllm")
    env = {**os.environ, "TMPDIR": str(scratch), "RKLLM_MODEL_DIR": str(models)}
    command = [sys.executable, "-m", "rkllm_core.tools.cli", "doctor", "--lib", str(sim_paths["1.3"])]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "using llama3.2-1b" in proc.stdout and "qwen3" not in proc.stdout  # the user's models, no demo ones
    assert list(scratch.iterdir()) == []
    env.pop("RKLLM_MODEL_DIR")  # no models named: the demo models, made in a folder that is removed again
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0 and "using gemma3-1b" in proc.stdout, proc.stdout + proc.stderr
    assert list(scratch.iterdir()) == []
