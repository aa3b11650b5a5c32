"""What the board looks like: SoC, RAM, kernel, NPU driver, CPU and devfreq clocks.

Decode speed on RK3588/RK3576 depends heavily on the CPU governor and the NPU
and DDR (DMC) clocks, so reports record them (:func:`read_system_state`).
Every reading is best effort: what cannot be read is listed in ``unreadable``
with the reason, never raised.

Models are converted for one SoC series: :func:`detect_board_platform` reads
this board's SoC from the device tree and :func:`platform_matches` tells
whether a model built for one platform suits another.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEVICE_TREE_COMPATIBLE",
    "SystemState",
    "detect_board_platform",
    "platform_matches",
    "read_system_state",
    "soc_series",
]

NPU_VERSION_PATHS = ("/sys/kernel/debug/rknpu/version", "/proc/debug/rknpu/version")
#: Where the board's SoC is read from.
DEVICE_TREE_COMPATIBLE: Final = "/proc/device-tree/compatible"

# A Rockchip SoC name as the device tree and model file names spell it.
PLATFORM_RE: Final = re.compile(r"^(?:rk|rv)\d{4}[a-z]?$")


@dataclass
class SystemState:
    """A snapshot of the machine's state relevant to NPU inference speed."""

    machine: str = ""
    kernel: str = ""
    python: str = ""
    board: str | None = None
    soc: str | None = None
    ram_mb: int | None = None
    npu_driver: str | None = None
    cpu_governors: dict[str, str] = field(default_factory=dict)
    cpu_freqs_mhz: dict[str, int] = field(default_factory=dict)
    devfreq: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


def _read(path: str | Path, state: SystemState, label: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\0\n ")
    except OSError as exc:
        state.unreadable[label] = f"{path}: {exc.strerror or exc}"
        return None


def read_system_state(root: str | os.PathLike[str] = "/") -> SystemState:
    """Read what is readable. ``root`` lets tests point at a fake filesystem tree."""
    base = Path(root)
    s = SystemState(
        machine=platform.machine(),
        kernel=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
    )
    _read_identity(base, s)
    _read_npu_driver(base, s)
    _read_cpufreq(base, s)
    _read_devfreq(base, s)
    return s


def _read_identity(base: Path, s: SystemState) -> None:
    """The board's name, its SoC and its RAM, from the device tree and ``/proc/meminfo``."""
    model = _read(base / "proc/device-tree/model", s, "board")
    s.board = model or None
    compatible = _read(base / "proc/device-tree/compatible", s, "soc")
    if compatible:
        socs = [c.split(",", 1)[1] for c in compatible.split("\0") if c.startswith("rockchip,rk") and "," in c]
        s.soc = socs[-1] if socs else None
    meminfo = _read(base / "proc/meminfo", s, "ram")
    if meminfo:
        for line in meminfo.splitlines():
            if line.startswith("MemTotal:"):
                s.ram_mb = int(line.split()[1]) // 1024
                break


def _read_npu_driver(base: Path, s: SystemState) -> None:
    """The NPU driver's version, from the first of :data:`NPU_VERSION_PATHS` that can be read."""
    for rel in NPU_VERSION_PATHS:
        p = base / rel.lstrip("/")
        try:
            s.npu_driver = p.read_text().strip().split(":")[-1].strip() or None
            s.unreadable.pop("npu_driver", None)
            break
        except OSError as exc:
            s.unreadable["npu_driver"] = f"{p}: {exc.strerror or exc} (debugfs may need root)"


def _read_cpufreq(base: Path, s: SystemState) -> None:
    """Each CPU's frequency governor and current frequency."""
    cpu_dir = base / "sys/devices/system/cpu"
    try:
        cpus = sorted(
            (d for d in cpu_dir.iterdir() if d.name[3:].isdigit() and d.name.startswith("cpu")),
            key=lambda d: int(d.name[3:]),
        )
    except OSError as exc:
        cpus = []
        s.unreadable["cpufreq"] = f"{cpu_dir}: {exc.strerror or exc}"
    for cpu in cpus:
        gov = cpu / "cpufreq/scaling_governor"
        freq = cpu / "cpufreq/scaling_cur_freq"
        try:
            s.cpu_governors[cpu.name] = gov.read_text().strip()
            s.cpu_freqs_mhz[cpu.name] = int(freq.read_text().strip()) // 1000
        except (OSError, ValueError) as exc:
            s.unreadable.setdefault("cpufreq", f"{cpu / 'cpufreq'}: {getattr(exc, 'strerror', None) or exc}")


def _read_devfreq(base: Path, s: SystemState) -> None:
    """The devfreq devices (NPU, DDR, GPU): governor and frequencies in MHz."""
    devfreq_dir = base / "sys/class/devfreq"
    try:
        devices = sorted(devfreq_dir.iterdir())
    except OSError as exc:
        devices = []
        s.unreadable["devfreq"] = f"{devfreq_dir}: {exc.strerror or exc}"
    for dev in devices:
        entry: dict[str, Any] = {}
        for key in ("governor", "cur_freq", "max_freq", "min_freq"):
            try:
                value = (dev / key).read_text().strip()
            except OSError:
                continue
            entry[key] = int(value) // 1_000_000 if key.endswith("freq") and value.isdigit() else value
        kind = "npu" if "npu" in dev.name else "dmc" if "dmc" in dev.name else "gpu" if "gpu" in dev.name else "other"
        entry["kind"] = kind
        s.devfreq[dev.name] = entry
    if not any(e.get("kind") == "npu" for e in s.devfreq.values()):
        s.unreadable.setdefault("npu_devfreq", "no NPU devfreq device under /sys/class/devfreq")
    if not any(e.get("kind") == "dmc" for e in s.devfreq.values()):
        s.unreadable.setdefault("dmc_devfreq", "no DDR (dmc) devfreq device under /sys/class/devfreq")


# --------------------------------------------------------------------------
# Platform
# --------------------------------------------------------------------------


def detect_board_platform(path: str | Path = DEVICE_TREE_COMPATIBLE) -> str | None:
    """Read the board's Rockchip SoC from the device tree.

    Args:
        path: the device tree's ``compatible`` file (NUL-separated
            ``vendor,model`` strings, most specific first).

    Returns:
        The SoC exactly as the device tree names it (``rk3588``, ``rk3588s``,
        ``rk3576``, ``rv1126b``), or None when the file is unreadable or names
        no Rockchip SoC. Compare with :func:`platform_matches`.
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    for raw in data.split(b"\0"):
        vendor, _, model = raw.decode("ascii", "replace").strip().lower().partition(",")
        if vendor == "rockchip" and PLATFORM_RE.match(model):
            return model
    return None


def soc_series(platform: str) -> str:
    """The SoC series a platform belongs to: ``rk3588s`` and ``rk3588j`` are ``rk3588``.

    Only an ``rk`` SoC's trailing letter is dropped: ``rv1126b`` is a different
    chip from ``rv1126``.

    Args:
        platform: a platform name such as ``RK3588S``.

    Returns:
        The lower-case series name.
    """
    lowered = platform.strip().lower()
    if re.fullmatch(r"rk\d{4}[a-z]", lowered):
        return lowered[:-1]
    return lowered


def platform_matches(model_platform: str | None, board_platform: str | None) -> bool:
    """Whether a model converted for ``model_platform`` suits ``board_platform``.

    Args:
        model_platform: the model's target, e.g. ``rk3588``.
        board_platform: the board's SoC, e.g. ``rk3588s``.

    Returns:
        True when both are known and in the same SoC series.
    """
    if not model_platform or not board_platform:
        return False
    return soc_series(model_platform) == soc_series(board_platform)
