"""System-state reading on a fake sysfs tree, and ``rkllm info``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rkllm_core.board import read_system_state
from rkllm_core.tools.cli import main


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_reads_a_board_tree(tmp_path: Path) -> None:
    _write(tmp_path, "proc/device-tree/model", "Orange Pi 5 Max\0")
    _write(tmp_path, "proc/device-tree/compatible", "xunlong,orangepi-5-max\0rockchip,rk3588\0")
    _write(tmp_path, "proc/meminfo", "MemTotal:       16318000 kB\nMemFree: 1 kB\n")
    _write(tmp_path, "sys/kernel/debug/rknpu/version", "RKNPU driver: v0.9.8\n")
    for i, (gov, khz) in enumerate([("ondemand", 1800000), ("performance", 2400000)]):
        _write(tmp_path, f"sys/devices/system/cpu/cpu{i}/cpufreq/scaling_governor", gov)
        _write(tmp_path, f"sys/devices/system/cpu/cpu{i}/cpufreq/scaling_cur_freq", str(khz))
    _write(tmp_path, "sys/class/devfreq/fdab0000.npu/governor", "rknpu_ondemand")
    _write(tmp_path, "sys/class/devfreq/fdab0000.npu/cur_freq", "1000000000")
    _write(tmp_path, "sys/class/devfreq/dmc/governor", "dmc_ondemand")
    _write(tmp_path, "sys/class/devfreq/dmc/cur_freq", "2112000000")
    s = read_system_state(tmp_path)
    assert s.board == "Orange Pi 5 Max" and s.soc == "rk3588" and s.ram_mb == 15935
    assert s.npu_driver == "v0.9.8"
    assert s.cpu_governors == {"cpu0": "ondemand", "cpu1": "performance"}
    assert s.cpu_freqs_mhz == {"cpu0": 1800, "cpu1": 2400}
    assert s.devfreq["fdab0000.npu"] == {"governor": "rknpu_ondemand", "cur_freq": 1000, "kind": "npu"}
    assert s.devfreq["dmc"]["kind"] == "dmc" and s.devfreq["dmc"]["cur_freq"] == 2112
    assert s.unreadable == {}


def test_unreadable_parts_are_reported_not_raised(tmp_path: Path) -> None:
    s = read_system_state(tmp_path)
    assert s.board is None and s.soc is None
    for key in ("board", "soc", "ram", "npu_driver", "cpufreq", "devfreq", "npu_devfreq", "dmc_devfreq"):
        assert key in s.unreadable, key


def test_info_json(capsys: pytest.CaptureFixture[str], sim_paths: dict[str, Path], model_dir: Path) -> None:
    from rkllm_core.sim import make_model

    make_model(model_dir)
    assert main(["info", "--json", "--lib", str(sim_paths["1.2"]), "--model-dir", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["library"]["abi"] == "1.2" and info["library"]["simulator"] is True
    assert info["models"] == ["qwen3-0.6b"]
    assert info["model_dirs"] == [{"path": str(model_dir), "exists": True}]
    assert "kernel" in info["system"]


def test_info_without_library_is_not_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["info", "--lib", str(tmp_path / "missing.so"), "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not usable" in out and "missing.so" in out and "0 found" in out
