"""Pre-flight checks before rkllm_init, driven by fake /proc and /sys trees, and their effect on loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rkllm_core import preflight
from rkllm_core.errors import PreflightError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.sim import SimulatorControl, make_model


def make_tree(
    root: Path,
    *,
    available_mb: int | None = 8000,
    rknpu: str | None = "RKNPU driver: v0.9.8",
    rknpu_module: bool = True,
    rocket: bool = False,
    soc: str | None = "rk3576",
    features: str = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc asimddp",
) -> Path:
    """A fake root with /proc/meminfo, /proc/cpuinfo, the device tree and NPU driver traces."""
    (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
    meminfo = "MemTotal:       16000000 kB\n"
    if available_mb is not None:
        meminfo += f"MemAvailable:   {available_mb * 1024} kB\n"
    (root / "proc/meminfo").write_text(meminfo)
    (root / "proc/cpuinfo").write_text(f"processor\t: 0\nFeatures\t: {features}\n")
    if soc:
        (root / "proc/device-tree/compatible").write_bytes(f"vendor,board\0rockchip,{soc}\0".encode())
    if rknpu is not None:
        (root / "sys/kernel/debug/rknpu").mkdir(parents=True, exist_ok=True)
        (root / "sys/kernel/debug/rknpu/version").write_text(rknpu + "\n")
    if rknpu_module:
        (root / "sys/module/rknpu").mkdir(parents=True, exist_ok=True)
    if rocket:
        (root / "sys/module/rocket").mkdir(parents=True, exist_ok=True)
        drivers = root / "sys/bus/platform/drivers/rocket"
        drivers.mkdir(parents=True, exist_ok=True)
        device = root / "sys/devices/platform/fdab0000.npu"
        device.mkdir(parents=True, exist_ok=True)
        os.symlink(drivers, device / "driver")
        (root / "sys/class/accel").mkdir(parents=True, exist_ok=True)
        (root / "sys/class/accel/accel0").mkdir()
        os.symlink(device, root / "sys/class/accel/accel0/device")
    return root


# -- the checks, one by one --------------------------------------------------------------------------------------


def test_memory(tmp_path: Path) -> None:
    one_gb = 1024**3
    assert preflight.check_memory(one_gb, make_tree(tmp_path / "a", available_mb=4000)).status == "ok"
    short = preflight.check_memory(one_gb, make_tree(tmp_path / "b", available_mb=900), name="big.rkllm")
    assert short.status == "problem" and short.blocking
    assert "900 MB available, big.rkllm needs about 1254 MB" in short.detail
    assert preflight.check_memory(one_gb, make_tree(tmp_path / "c", available_mb=None)).status == "unknown"
    assert preflight.check_memory(one_gb, tmp_path / "nothing-here").status == "unknown"


def test_npu_driver(tmp_path: Path) -> None:
    assert preflight.check_npu_driver(make_tree(tmp_path / "ok")).detail == "rknpu 0.9.8"
    old = preflight.check_npu_driver(make_tree(tmp_path / "old", rknpu="RKNPU driver: v0.9.6"))
    assert old.status == "warning" and "older than the 0.9.8" in old.detail and not old.blocking
    rocket = preflight.check_npu_driver(make_tree(tmp_path / "rocket", rknpu=None, rknpu_module=False, rocket=True))
    assert rocket.status == "problem" and "'rocket'" in rocket.detail
    no_root = preflight.check_npu_driver(make_tree(tmp_path / "noroot", rknpu=None))  # debugfs unreadable
    assert no_root.status == "ok" and "needs root" in no_root.detail
    nothing = preflight.check_npu_driver(make_tree(tmp_path / "none", rknpu=None, rknpu_module=False))
    assert nothing.status == "unknown"


def test_cpu(tmp_path: Path) -> None:
    affected = preflight.check_cpu("1.3.0", make_tree(tmp_path / "a", soc="rk3588"))
    assert affected.status == "warning" and "#518" in affected.detail and "asimddp" in affected.detail
    assert preflight.check_cpu("1.2.3", make_tree(tmp_path / "b", soc="rk3588")).status == "ok"
    assert preflight.check_cpu("1.3.0", make_tree(tmp_path / "c", soc="rk3576")).status == "ok"
    assert preflight.check_cpu("1.3.0", make_tree(tmp_path / "d", soc=None)).status == "unknown"
    assert preflight.check_cpu(None, make_tree(tmp_path / "e")).status == "unknown"


def test_enforce_raises_only_for_what_would_crash(tmp_path: Path) -> None:
    model = tmp_path / "m.rkllm"
    model.write_bytes(b"\0" * 1024)
    preflight.enforce(preflight.check(model, "1.3.0", make_tree(tmp_path / "fine", soc="rk3588")))  # a warning only
    rocket = make_tree(tmp_path / "r", rknpu=None, rknpu_module=False, rocket=True)
    with pytest.raises(PreflightError) as err:
        preflight.enforce(preflight.check(model, "1.3.0", rocket))
    assert err.value.check == "npu driver"


# -- before rkllm_init ----------------------------------------------------------------------------------------


def test_the_runtime_refuses_to_init_when_a_check_would_crash(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_model(model_dir, size_mb=1000)
    monkeypatch.setattr(preflight, "SYSTEM_ROOT", str(make_tree(tmp_path / "low", available_mb=700)))
    inits = sim.counter("inits") + sim.counter("init_failures")
    with pytest.raises(PreflightError, match="700 MB available") as err:
        RKLLMRuntime(path, library=sim_lib, preflight=True)
    assert err.value.check == "memory"
    rocket = make_tree(tmp_path / "rocket", rknpu=None, rknpu_module=False, rocket=True)
    monkeypatch.setattr(preflight, "SYSTEM_ROOT", str(rocket))
    with pytest.raises(PreflightError, match="rocket"):
        RKLLMRuntime(path, library=sim_lib, preflight=True)
    assert sim.counter("inits") + sim.counter("init_failures") == inits  # the runtime never saw either
    with RKLLMRuntime(path, library=sim_lib) as rt:  # the simulator: checks off unless asked for
        assert rt.generate("hi").text.startswith("Echo: hi")


def test_the_manager_unloads_an_idle_model_to_free_the_memory_a_load_needs(
    sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_model(model_dir, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm", size_mb=300)
    make_model(model_dir, "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm", size_mb=300)
    total_mb = 700.0  # the board's free memory with nothing loaded: room for one model (about 458 MB each)
    monkeypatch.setattr(preflight, "memory_available_mb", lambda root="/": total_mb - 330 * sim.counter("live_handles"))
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=None, preflight=True) as m:
        with m.lease("qwen3-0.6b"):
            pass
        with m.lease("gemma3-270m") as lease:  # no budget limit, but not enough memory for both
            assert lease.info.name == "gemma3-270m"
        assert [e.info.name for e in m.loaded()] == ["gemma3-270m"]
        with m.lease("qwen3-0.6b"), pytest.raises(PreflightError, match="memory"):
            m.lease("gemma3-270m")  # the only model that could make room is in use: refused, not crashed
    assert sim.counter("destroy_while_running") == 0
