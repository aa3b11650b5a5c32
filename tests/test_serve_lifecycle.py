"""`rkllm serve` as a service: SIGTERM / Ctrl-C with live streams, a second signal, --preload.

Each test runs the server as its own process on the simulator, as a supervisor would, with the
simulator's exit report (``RKLLM_SIM_REPORT``) telling whether every handle was destroyed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from rkllm_core.sim import make_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
STREAMS = 16
EXIT_BOUND = 60.0  # generous upper bound for any exit below


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the abort switch, without a server ------------------------------------------------------------------------


def test_an_abort_ends_a_waiting_stream_and_closes_it() -> None:
    from rkllm_core.serve.deps import Stopping

    closed = asyncio.Event()

    async def events() -> AsyncGenerator[int, None]:
        try:
            yield 1
            await asyncio.sleep(3600)  # a run that would go on and on
            yield 2
        finally:
            closed.set()

    async def main() -> list[int]:
        stopping = Stopping()
        seen = []
        async for event in stopping.until_abort(events()):
            seen.append(event)
            asyncio.get_running_loop().call_soon(stopping.abort)
        assert closed.is_set() and stopping.aborted
        return seen

    assert asyncio.run(main()) == [1]


def test_a_cancel_of_the_consumer_still_propagates() -> None:
    from rkllm_core.serve.deps import Stopping

    async def events() -> AsyncGenerator[int, None]:
        yield 1
        await asyncio.sleep(3600)
        yield 2

    async def consume(stopping: Stopping, started: asyncio.Event) -> None:
        async for _ in stopping.until_abort(events()):
            started.set()

    async def main() -> None:
        stopping, started = Stopping(), asyncio.Event()
        task = asyncio.create_task(consume(stopping, started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


# -- the server as a process -----------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    report: Path
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = EXIT_BOUND) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, self.output
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, object]:
        body: dict[str, object] = httpx.get(self.url + "/health", timeout=5).json()
        return body

    def wait_until(self, ready: Callable[[dict[str, object]], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.finish()}")
            try:
                if ready(self.health()):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the server never got ready")

    def finish(self, timeout: float = EXIT_BOUND) -> str:
        """Wait for the exit; the process's whole output."""
        self.proc.wait(timeout)
        assert self.reader is not None
        self.reader.join(timeout)
        return self.output

    def counters(self) -> dict[str, int]:
        counts: dict[str, int] = json.loads(self.report.read_text())
        return counts


@pytest.fixture
def start(sim_paths: dict[str, Path], abi: str, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def run(*args: str, token_delay_ms: int = 20, init_delay_ms: int = 0, wait: bool = True) -> Server:
        models = tmp_path / "models"
        make_model(models, QWEN)
        port = free_port()
        report = tmp_path / f"report-{len(servers)}.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
        env.update(
            RKLLM_LIB_PATH=str(sim_paths[abi]),
            RKLLM_PROMPT_CACHE_DIR=str(tmp_path / "pcache"),
            RKLLM_SIM_TOKEN_DELAY_MS=str(token_delay_ms),
            RKLLM_SIM_INIT_DELAY_MS=str(init_delay_ms),
            RKLLM_SIM_REPORT=str(report),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        cmd = [sys.executable, "-m", "rkllm_core.serve", "--port", str(port), "--model-dir", str(models), *args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        server = Server(proc, port, report)
        servers.append(server)
        if wait:
            server.wait_until(lambda h: h["status"] == "ok")
        return server

    yield run
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@dataclass
class Stream:
    """One client's streamed chat completion, as it arrived."""

    status: int | None = None
    chunks: list[dict[str, object]] = field(default_factory=list)
    done: bool = False  # data: [DONE] seen
    error: BaseException | None = None
    body: str = ""
    first_token: threading.Event = field(default_factory=threading.Event)

    @property
    def finish_reason(self) -> object:
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks if c.get("choices")]  # type: ignore[index]
        return reasons[-1] if reasons else None

    def cleanly_ended(self) -> bool:
        """A stream ended with a finish reason and [DONE], or a request refused with an OpenAI error."""
        if self.error is not None:
            return False
        if self.status == 200:
            return self.done and self.finish_reason in ("stop", "length")
        return self.status == 503 and json.loads(self.body)["error"]["code"] == "shutting_down"


def open_stream(url: str, max_tokens: int, stream: Stream) -> None:
    body = {
        "model": "qwen3-0.6b",
        "messages": [{"role": "user", "content": f"Please count to {max_tokens}."}],  # the simulator obeys
        "stream": True,
        "max_tokens": max_tokens,
    }
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            stream.status = r.status_code
            if r.status_code != 200:
                stream.body = r.read().decode()
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    stream.done = True
                    continue
                chunk = json.loads(line[6:])
                stream.chunks.append(chunk)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stream.first_token.set()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        stream.error = exc
    finally:
        stream.first_token.set()  # never leave the test waiting


def live_streams(server: Server, max_tokens: int) -> tuple[list[Stream], list[threading.Thread]]:
    """STREAMS requests in flight (one generating, the others in the line for the NPU)."""
    first_token = threading.Event()  # any stream's
    streams = [Stream(first_token=first_token) for _ in range(STREAMS)]
    threads = [threading.Thread(target=open_stream, args=(server.url, max_tokens, s)) for s in streams]
    for t in threads:
        t.start()
    # every request has reached the app (the /health request itself is one more)
    server.wait_until(lambda h: int(h["requests"]) >= STREAMS + 1)  # type: ignore[call-overload]
    assert first_token.wait(60)
    return streams, threads


def assert_stopped_cleanly(server: Server, out: str) -> None:
    assert "Traceback" not in out, out
    assert "rkllm serve: stopped" in out, out
    counts = server.counters()
    assert counts["live_handles"] == 0, counts
    assert counts["active_runs"] == 0, counts


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_first_signal_finishes_every_stream(start: Callable[..., Server], sig: signal.Signals) -> None:
    server = start("--shutdown-timeout", "60", token_delay_ms=10)
    streams, threads = live_streams(server, max_tokens=40)
    server.proc.send_signal(sig)
    out = server.finish()
    for t in threads:
        t.join(EXIT_BOUND)
    assert server.proc.returncode == 0, out
    finishing = re.search(r"finishing (\d+) requests \(Ctrl-C again to abort\)", out)
    assert finishing is not None and 0 < int(finishing.group(1)) <= STREAMS + 1, out
    assert all(s.status == 200 and s.done and s.finish_reason in ("stop", "length") for s in streams), streams
    access = re.findall(r"POST /v1/chat/completions model=qwen3-0.6b 200 tokens=\d+\+\d+ \d+ms", out)
    assert len(access) == STREAMS, out  # the access log: one line per request
    assert_stopped_cleanly(server, out)


def test_shutdown_timeout_ends_every_stream_cleanly(start: Callable[..., Server]) -> None:
    server = start("--shutdown-timeout", "1", token_delay_ms=20)
    streams, threads = live_streams(server, max_tokens=4000)  # far longer than the timeout
    server.proc.send_signal(signal.SIGTERM)
    out = server.finish()
    for t in threads:
        t.join(EXIT_BOUND)
    assert server.proc.returncode == 0, out
    assert all(s.cleanly_ended() for s in streams), streams
    cut = [s for s in streams if s.status == 200]
    assert cut and all(s.finish_reason == "length" for s in cut)  # the generating one was cut short
    assert "aborting" in out, out
    assert_stopped_cleanly(server, out)


def test_second_ctrl_c_aborts_at_once(start: Callable[..., Server]) -> None:
    server = start("--shutdown-timeout", "600", token_delay_ms=20)
    streams, threads = live_streams(server, max_tokens=4000)
    server.proc.send_signal(signal.SIGINT)
    server.wait_for_line("Ctrl-C again to abort")
    server.proc.send_signal(signal.SIGINT)
    out = server.finish()  # long before the 600 s shutdown timeout
    for t in threads:
        t.join(EXIT_BOUND)
    assert server.proc.returncode == 130, out
    assert all(s.cleanly_ended() for s in streams), streams
    assert_stopped_cleanly(server, out)


def test_preload_loads_before_the_first_request(start: Callable[..., Server]) -> None:
    server = start("--preload", "qwen3-0.6b")
    assert server.health()["loaded"] == ["qwen3-0.6b"]
    server.proc.send_signal(signal.SIGTERM)
    out = server.finish()
    assert server.proc.returncode == 0, out
    assert_stopped_cleanly(server, out)
    assert server.counters()["inits"] == 1


def test_sigterm_while_preloading_still_closes_and_says_stopped(start: Callable[..., Server]) -> None:
    server = start("--preload", "qwen3-0.6b", init_delay_ms=1500, wait=False)
    server.wait_for_line("loading qwen3-0.6b")
    server.proc.send_signal(signal.SIGTERM)  # during the load (rkllm_init takes 1.5 s)
    out = server.finish()
    assert server.proc.returncode == 130, out
    assert "http://" in out and "finishing" not in out, out  # it never started serving
    assert_stopped_cleanly(server, out)


def test_no_access_log(start: Callable[..., Server]) -> None:
    server = start("--no-access-log")
    body = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    out = server.finish()
    assert server.proc.returncode == 0, out
    assert "/v1/chat/completions" not in out and "/health" not in out, out
    assert_stopped_cleanly(server, out)


def test_preload_of_an_unknown_model_fails_the_start(start: Callable[..., Server]) -> None:
    server = start("--preload", "no-such-model", wait=False)
    out = server.finish()
    assert server.proc.returncode == 2, out
    assert "no-such-model" in out and "Traceback" not in out, out
    assert server.counters()["live_handles"] == 0
