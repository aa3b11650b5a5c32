"""Build the RKLLM simulator library for both ABIs and run the C test driver against each build.

The driver (tests/c/sim_driver.c) dlopen()s the library and calls every exported function through the
runtime's C ABI, printing one ``ok``/``FAIL`` line per check. Skipped only when no C compiler exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIM_SRC = ROOT / "rkllm_core" / "sim" / "rkllm_sim.c"
DRIVER_SRC = ROOT / "tests" / "c" / "sim_driver.c"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]


def _find_cc() -> str | None:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


CC = _find_cc()

pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH"),
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="the simulator targets Linux (ELF, pthread, dlopen)"
    ),
]


def _build_all(cmds: list[list[str]]) -> None:
    """Run the compiler commands in parallel; fail with the compiler output if any fails."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    for cmd, proc in zip(cmds, procs, strict=False):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"build failed: {' '.join(cmd)}\n{out}{err}"


@pytest.mark.parametrize("abi", [12, 13])
def test_sim_driver(abi: int, tmp_path: Path) -> None:
    lib = tmp_path / f"libsim{abi}.so"
    driver = tmp_path / f"sim_driver{abi}"
    _build_all(
        [
            [CC, *CFLAGS, "-shared", "-fPIC", f"-DRKLLM_SIM_ABI={abi}", str(SIM_SRC), "-o", str(lib)],
            [CC, *CFLAGS, f"-DRKLLM_SIM_ABI={abi}", str(DRIVER_SRC), "-o", str(driver), "-ldl"],
        ]
    )
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([str(driver), str(lib), str(work)], capture_output=True, text=True, timeout=60)
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    report = f"exit {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    assert not failed, report
    assert run.returncode == 0, report
    assert f"0 failed (ABI {abi})" in run.stdout, report

    # Only the runtime's API and the simulator controls are exported.
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
        funcs = {
            parts[2]
            for parts in (line.split() for line in syms.stdout.splitlines())
            if len(parts) == 3 and parts[1] == "T"
        }
        assert funcs and all(name.startswith("rkllm_") for name in funcs), sorted(funcs)
        assert {"rkllm_init", "rkllm_run", "rkllm_sim_abi", "rkllm_sim_counter"} <= funcs
