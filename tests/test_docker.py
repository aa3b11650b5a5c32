"""The container: the Dockerfile builds, `rkllm serve` answers in it, and `docker stop` is a clean exit.

Runs only where a Docker daemon answers (skipped elsewhere). The runtime is the simulator, built on
this machine and mounted where the board's librkllmrt.so would be, so the image is the one a board
would run; no NPU device nodes are needed for that.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from rkllm_core.sim import make_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _docker_answers(), reason="no Docker daemon here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    tag = f"rkllm-serve-test:{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


def test_the_container_serves_and_stops_cleanly(image: str, sim_paths: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model(models, QWEN)
    port = free_port()
    name = f"rkllm-test-{uuid.uuid4().hex[:8]}"
    run = [
        "docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080",
        "-v", f"{sim_paths['1.3']}:/usr/lib/librkllmrt.so:ro",
        "-v", f"{models}:/models:ro",
        image, "--preload", "qwen3-0.6b",
    ]  # fmt: skip
    subprocess.run(run, check=True, capture_output=True, timeout=120)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert health is not None and health["loaded"] == ["qwen3-0.6b"], health
        body = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "count to 3"}]}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == "1 2 3"
        subprocess.run(["docker", "stop", "-t", "45", name], check=True, capture_output=True, timeout=120)
        state = json.loads(subprocess.run(
            ["docker", "inspect", "-f", "{{json .State}}", name], check=True, capture_output=True, text=True
        ).stdout)  # fmt: skip
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
        out = logs.stdout + logs.stderr
        assert state["ExitCode"] == 0, out
        assert "rkllm serve: stopped" in out and "Traceback" not in out, out
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, timeout=120)
