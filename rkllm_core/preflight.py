"""Checks before ``rkllm_init`` for the crashes that top the runtime's issue tracker.

The runtime does not fail cleanly in these cases, so they are checked first,
from what any user may read (no root): what needs root is reported as
unknown, never guessed.

* **Memory.** A second init that runs out of memory segfaults instead of
  returning -1 (rknn-llm #522): ``MemAvailable`` (``/proc/meminfo``) must hold
  the model file plus a margin. The model manager unloads idle models first
  when that frees enough.
* **NPU driver.** The runtime needs Rockchip's vendor ``rknpu`` driver; the
  mainline ``rocket`` driver is not supported. The vendor driver's version
  (``>= 0.9.8``) is read where it is readable (debugfs usually needs root).
* **CPU.** Some runtime builds use CPU instructions the board lacks
  ("Illegal instruction" with the 1.3.0 build on RK3588, rknn-llm #518): known-affected
  combinations are reported, with the CPU's features.

:func:`check` returns one :class:`Finding` per check; :func:`enforce` raises
:class:`~rkllm_core.errors.PreflightError` for the findings that would crash
(too little memory, the wrong NPU driver). The others are advice, shown by
``rkllm doctor``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from .board import DEVICE_TREE_COMPATIBLE, NPU_VERSION_PATHS
from .errors import PreflightError

__all__ = [
    "MIN_NPU_DRIVER",
    "SYSTEM_ROOT",
    "Finding",
    "check",
    "check_cpu",
    "check_memory",
    "check_npu_driver",
    "enforce",
    "memory_available_mb",
    "memory_needed_mb",
]

SYSTEM_ROOT = "/"
"""Where /proc and /sys are read from (tests point it at a fake tree)."""
MIN_NPU_DRIVER: Final = (0, 9, 8)
"""The oldest vendor rknpu driver the runtime supports."""
MEMORY_MARGIN_MB: Final = 128.0
"""Room kept free beyond the model file (runtime buffers, KV cache, the process)."""
MEMORY_FACTOR: Final = 1.1
"""The runtime's memory is about the file size; 10 % more for its own tables."""

# Builds reported to crash with "Illegal instruction" on a SoC, and where it was reported.
KNOWN_CPU_PROBLEMS: Final = {("1.3.0", "rk3588"): "rknn-llm #518"}

Status = Literal["ok", "problem", "warning", "unknown"]


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: ``ok``, ``problem`` (init would crash), ``warning`` or ``unknown``."""

    check: str
    status: Status
    detail: str

    @property
    def blocking(self) -> bool:
        """True when the runtime must not be initialised."""
        return self.status == "problem"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\0\n ")
    except OSError:
        return None


def memory_available_mb(root: str | os.PathLike[str] = "/") -> float | None:
    """``MemAvailable`` in MB, or None when it cannot be read."""
    text = _read(Path(root) / "proc/meminfo")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            try:
                return int(line.split()[1]) / 1024
            except (IndexError, ValueError):
                return None
    return None


def memory_needed_mb(model_bytes: int) -> float:
    """What loading a model of ``model_bytes`` needs free: the file, 10 % more, and a margin."""
    return model_bytes / (1024 * 1024) * MEMORY_FACTOR + MEMORY_MARGIN_MB


def check_memory(model_bytes: int, root: str | os.PathLike[str] = "/", *, name: str = "the model") -> Finding:
    """Enough available memory for a model of ``model_bytes``?"""
    available = memory_available_mb(root)
    need = memory_needed_mb(model_bytes)
    if available is None:
        return Finding("memory", "unknown", "MemAvailable could not be read from /proc/meminfo")
    detail = f"{available:.0f} MB available, {name} needs about {need:.0f} MB"
    if available < need:
        return Finding(
            "memory",
            "problem",
            f"{detail}: loading it would exhaust memory (the runtime then crashes instead of failing); "
            "unload other models or stop other programs",
        )
    return Finding("memory", "ok", detail)


def _version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in m.groups()) if m else None


def _driver_names(root: Path) -> set[str]:
    """Kernel driver names bound to DRM, accel and misc devices (readable by anyone)."""
    names: set[str] = set()
    for cls in ("drm", "accel", "misc"):
        try:
            devices = list((root / "sys/class" / cls).iterdir())
        except OSError:
            continue
        for dev in devices:
            try:
                names.add(os.path.basename(os.readlink(dev / "device/driver")).lower())
            except OSError:
                continue
    return names


def check_npu_driver(root: str | os.PathLike[str] = "/") -> Finding:
    """Rockchip's rknpu driver loaded (and recent enough), not the mainline rocket driver?"""
    base = Path(root)
    drivers = _driver_names(base)
    rknpu = (base / "sys/module/rknpu").exists() or any("rknpu" in d for d in drivers)
    rocket = (base / "sys/module/rocket").exists() or "rocket" in drivers
    version_text = next((t for p in NPU_VERSION_PATHS if (t := _read(base / p.lstrip("/"))) is not None), None)
    version = _version(version_text) if version_text else None
    if version is not None:
        rknpu = True
    if rocket and not rknpu:
        return Finding(
            "npu driver",
            "problem",
            "the mainline 'rocket' NPU driver is loaded: the RKLLM runtime supports only Rockchip's 'rknpu' "
            "driver (a vendor kernel, e.g. the board maker's 5.10 or 6.1 BSP)",
        )
    if version is not None:
        shown = ".".join(map(str, version))
        if version < MIN_NPU_DRIVER:
            need = ".".join(map(str, MIN_NPU_DRIVER))
            return Finding("npu driver", "warning", f"rknpu {shown} is older than the {need} the runtime needs")
        return Finding("npu driver", "ok", f"rknpu {shown}")
    if rknpu:
        return Finding("npu driver", "ok", "rknpu loaded (its version is in debugfs, which needs root)")
    return Finding("npu driver", "unknown", "no NPU driver found under /sys (not a Rockchip board, or no access)")


def _soc(root: Path) -> str | None:
    text = _read(root / DEVICE_TREE_COMPATIBLE.lstrip("/"))
    if not text:
        return None
    socs = [c.split(",", 1)[1] for c in text.split("\0") if c.startswith("rockchip,r") and "," in c]
    return socs[-1] if socs else None


def cpu_features(root: str | os.PathLike[str] = "/") -> list[str]:
    """The CPU features /proc/cpuinfo lists (``Features`` on ARM, ``flags`` elsewhere)."""
    text = _read(Path(root) / "proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Features", "flags"):
            return value.split()
    return []


def check_cpu(runtime_version: str | None, root: str | os.PathLike[str] = "/") -> Finding:
    """Is this runtime build known to use instructions this SoC lacks?"""
    base = Path(root)
    soc = _soc(base)
    features = cpu_features(base)
    shown = f"CPU features: {' '.join(features[:24])}{' …' if len(features) > 24 else ''}" if features else ""
    if runtime_version is None or soc is None:
        missing = "the runtime's version" if runtime_version is None else "the SoC"
        return Finding("cpu", "unknown", f"{missing} is not known; {shown or 'CPU features unknown'}")
    report = KNOWN_CPU_PROBLEMS.get((runtime_version, soc))
    if report is not None:
        return Finding(
            "cpu",
            "warning",
            f"runtime {runtime_version} on {soc} is reported to stop with 'Illegal instruction' ({report}); "
            f"if rkllm_init crashes, use another runtime build. {shown}",
        )
    return Finding("cpu", "ok", f"no known problem for runtime {runtime_version} on {soc}. {shown}".strip())


def check(
    model_path: str | os.PathLike[str], runtime_version: str | None, root: str | os.PathLike[str] | None = None
) -> list[Finding]:
    """Every pre-flight check for loading ``model_path`` with a runtime of ``runtime_version``."""
    root = SYSTEM_ROOT if root is None else root
    path = Path(model_path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return [check_memory(size, root, name=path.name), check_npu_driver(root), check_cpu(runtime_version, root)]


def enforce(findings: Sequence[Finding]) -> None:
    """Raise :class:`~rkllm_core.errors.PreflightError` for the first finding that would crash the runtime."""
    for finding in findings:
        if finding.blocking:
            raise PreflightError(f"not loading the model: {finding.detail}", check=finding.check)
