"""``rkllm chat``: streaming REPL, slash commands, Ctrl-C stops the answer but not the program."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rkllm_core.sim import make_model


def _start(sim_paths: dict[str, Path], model_dir: Path, delay_ms: str = "0") -> subprocess.Popen[str]:
    make_model(model_dir)
    env = {**os.environ, "RKLLM_SIM_TOKEN_DELAY_MS": delay_ms, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rkllm_core.tools.cli",
        "chat",
        "qwen3-0.6b",
        "--lib",
        str(sim_paths["1.3"]),
        "--model-dir",
        str(model_dir),
    ]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_chat_session(sim_paths: dict[str, Path], model_dir: Path) -> None:
    proc = _start(sim_paths, model_dir)
    out, err = proc.communicate("hello\n/think on\nwhy\n/system be terse\nagain\n/reset\n/exit\n", timeout=60)
    assert proc.returncode == 0, err
    assert "Echo: hello — ok." in out
    assert "The user wrote" in out and "Echo: why — ok." in out  # reasoning shown, then the answer
    assert "(system prompt set; conversation cleared)" in out and "(conversation cleared)" in out
    assert "Traceback" not in err


def test_ctrl_c_stops_the_answer_not_the_program(sim_paths: dict[str, Path], model_dir: Path) -> None:
    proc = _start(sim_paths, model_dir, delay_ms="2")
    assert proc.stdin is not None and proc.stdout is not None
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    proc.stdin.write("count to 100000\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 20
    while "1 2 3 4 5" not in "".join(seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    while "(stopped)" not in "".join(seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.stdin.write("hello\n/exit\n")
    proc.stdin.flush()
    proc.wait(timeout=30)
    reader.join(5)
    out = "".join(seen)
    assert proc.returncode == 0
    assert "(stopped)" in out and "Echo: hello — ok." in out
    assert "99999" not in out  # the long answer really was cut
