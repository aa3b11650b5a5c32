"""Two `rkllm serve` processes behind nginx with the shipped config: affinity, KV reuse, failover.

Needs the nginx binary (CI installs it; the test is skipped without it). Each server runs on the
simulator as its own process, like one board each.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")

from rkllm_core.sim import make_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[str] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


@pytest.fixture(params=["1.2", "1.3"], ids=["abi12", "abi13"])
def boards(
    request: pytest.FixtureRequest, sim_paths: dict[str, Path], tmp_path: Path
) -> Iterator[dict[str, tuple[int, subprocess.Popen[str]]]]:
    procs: dict[str, tuple[int, subprocess.Popen[str]]] = {}
    for name in ("board-a", "board-b"):
        models = tmp_path / name / "models"
        make_model(models, QWEN)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
        env.update(
            RKLLM_LIB_PATH=str(sim_paths[request.param]),
            RKLLM_PROMPT_CACHE_DIR=str(tmp_path / name / "pcache"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        cmd = [
            sys.executable,
            "-m",
            "rkllm_core.serve",
            "--port",
            str(port),
            "--model-dir",
            str(models),
            "--board",
            name,
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs[name] = (port, proc)
    for port, proc in procs.values():
        wait_for(f"http://127.0.0.1:{port}/health", proc)
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for _, proc in procs.values():
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert "Traceback" not in out, out


@pytest.fixture
def balancer(boards: dict[str, tuple[int, subprocess.Popen[str]]], tmp_path: Path) -> Iterator[str]:
    """nginx running the shipped config, with the boards' addresses and a port of its own."""
    conf = (ROOT / "deploy" / "nginx-rkllm.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=15s;\n" for port, _ in boards.values())
    conf = re.sub(r"(?m)^    server 192\.168\.1\.\d+:8080.*\n", "", conf)
    conf = conf.replace("    keepalive 16;", servers + "    keepalive 16;")
    port = free_port()
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    main = (
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
        f"  fastcgi_temp_path {prefix}/fcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n"
        f"{conf}\n}}\n"
    )
    (prefix / "nginx.conf").write_text(main)
    assert NGINX is not None
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(f"http://127.0.0.1:{port}/health", proc)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_a_conversation_sticks_to_its_board_and_survives_losing_it(
    balancer: str, boards: dict[str, tuple[int, subprocess.Popen[str]]]
) -> None:
    history = [{"role": "system", "content": "Answer briefly."}]
    headers = {"X-Session-ID": "conversation-42"}
    seen = []
    cached: list[int] = []
    with httpx.Client(base_url=balancer, timeout=60) as client:

        def turn(text: str) -> httpx.Response:
            history.append({"role": "user", "content": text})
            r = client.post("/v1/chat/completions", json={"model": "qwen3-0.6b", "messages": history}, headers=headers)
            assert r.status_code == 200, r.text
            history.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            seen.append((r.headers["x-rkllm-board"], r.headers["x-rkllm-kv-reused"]))
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            return r

        for i in range(3):
            turn(f"question {i}")
        home = seen[0][0]
        assert seen == [(home, "false"), (home, "true"), (home, "true")]  # affinity: the KV cache is reused
        assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]  # only each new turn was prefilled

        def boards_for(keys: range) -> set[str]:
            used = set()
            for k in keys:
                r = client.post(
                    "/v1/chat/completions",
                    json={"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"X-Session-ID": f"user-{k}"},
                )
                assert r.status_code == 200
                used.add(r.headers["x-rkllm-board"])
            return used

        assert boards_for(range(16)) == {"board-a", "board-b"}  # conversations spread over both boards
        boards[home][1].send_signal(signal.SIGINT)  # that board goes away mid-conversation
        boards[home][1].wait(30)
        answer = turn("question 3")  # no error for the client: the other board rebuilds once
        assert answer.json()["choices"][0]["message"]["content"] == "Echo: question 3 — ok."
        turn("question 4")
        other = seen[3][0]
        assert other != home and seen[3:] == [(other, "false"), (other, "true")]
        assert boards_for(range(16)) == {other}  # only one board is left, and it serves everyone
