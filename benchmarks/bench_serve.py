"""Load on `rkllm serve` (simulator): many concurrent streaming clients, errors, memory, and what HTTP adds.

A server on a real socket (uvicorn in a thread, the app from ``rkllm_core.serve``) with two chat
models. Two parts:

* load: ``--requests`` streaming chat requests in waves of ``--concurrency``, alternating models,
  half over OpenAI's ``/v1/chat/completions`` (SSE) and half over Ollama's ``/api/chat`` (NDJSON);
  the process RSS after each wave, and at the end the simulator's handle and violation counters;
* overhead: at a board's pace (``--pace-ms`` per token), one request at a time, the same answer
  in-process (``ChatEngine.astream``), over SSE and over NDJSON: the time to first token each adds
  over in-process, and its decode tokens/s divided by in-process (medians of ``--runs`` requests,
  the three ways taking turns).

Usage: python benchmarks/bench_serve.py [--requests 1000] [--concurrency 64] [--abi 1.3]
       [--pace-ms 30] [--runs 8] [--count 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import uvicorn
from bench_core import machine

from rkllm_core.chat.engine import ChatEngine, TextDelta
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.serve import create_app
from rkllm_core.sim import SimulatorControl, build_simulator, make_model


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sse_text(line: str) -> str:
    """The content an OpenAI SSE line carries ("" for none)."""
    if not line.startswith("data: {"):
        return ""
    return "".join(c["delta"].get("content") or "" for c in json.loads(line[6:]).get("choices", []))


def ndjson_text(line: str) -> str:
    """The content an Ollama NDJSON line carries ("" for none); an error line raises."""
    obj = json.loads(line)
    if "error" in obj:
        raise RuntimeError(obj["error"])
    return str(obj.get("message", {}).get("content") or "")


async def one(client: httpx.AsyncClient, i: int) -> tuple[bool, str]:
    model = "qwen3-0.6b" if i % 2 else "gemma3-1b"
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"request {i}"}]}
    ollama = i % 4 >= 2
    path, text_of = ("/api/chat", ndjson_text) if ollama else ("/v1/chat/completions", sse_text)
    text = []
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return False, f"{response.status_code}"
        async for line in response.aiter_lines():
            if line:
                text.append(text_of(line))
    answer = "".join(text)
    return answer == f"Echo: request {i} — ok.", answer


async def load(base: str, requests: int, concurrency: int) -> tuple[int, list[tuple[int, float]], float]:
    errors = 0
    samples = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        for start in range(0, requests, concurrency):
            results = await asyncio.gather(*(one(client, i) for i in range(start, min(requests, start + concurrency))))
            errors += sum(not ok for ok, _ in results)
            samples.append((min(requests, start + concurrency), rss_mb()))
    return errors, samples, time.perf_counter() - t0


Timed = tuple[float, list[float]]
"""A request's start and the arrival time of each piece of its answer (``perf_counter``)."""


async def in_process(engine: ChatEngine, prompt: str) -> Timed:
    t0, times = time.perf_counter(), []
    async for event in engine.astream("qwen3-0.6b", [ChatMessage("user", prompt)]):
        if isinstance(event, TextDelta) and event.text:
            times.append(time.perf_counter())
    return t0, times


async def over_http(client: httpx.AsyncClient, path: str, text_of: Callable[[str], str], prompt: str) -> Timed:
    body = {"model": "qwen3-0.6b", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    t0, times = time.perf_counter(), []
    async with client.stream("POST", path, json=body) as response:
        async for line in response.aiter_lines():
            if line and text_of(line):
                times.append(time.perf_counter())
    return t0, times


async def overhead(base: str, manager: ModelManager, runs: int, count: int) -> dict[str, tuple[float, float]]:
    """Median time to first token (ms) and decode tokens/s of each way, one request at a time."""
    engine = ChatEngine(manager)
    measured: dict[str, list[Timed]] = {"in-process": [], "SSE": [], "NDJSON": []}
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        ways: dict[str, Callable[[str], Awaitable[Timed]]] = {
            "in-process": lambda p: in_process(engine, p),
            "SSE": lambda p: over_http(client, "/v1/chat/completions", sse_text, p),
            "NDJSON": lambda p: over_http(client, "/api/chat", ndjson_text, p),
        }
        await ways["in-process"]("warm up")  # the model is loaded before anything is timed
        for i in range(runs):
            for name, way in ways.items():
                measured[name].append(await way(f"count to {count} ({name} {i})"))
    out = {}
    for name, timed in measured.items():
        ttft = statistics.median((times[0] - t0) * 1000 for t0, times in timed)
        rate = statistics.median((len(times) - 1) / (times[-1] - times[0]) for _, times in timed)
        out[name] = (ttft, rate)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    ap.add_argument("--pace-ms", type=float, default=30.0, help="simulated ms per token for the overhead part")
    ap.add_argument("--runs", type=int, default=8, help="requests per way in the overhead part")
    ap.add_argument("--count", type=int, default=60, help="the overhead part asks to count to this")
    args = ap.parse_args()
    lib = build_simulator(args.abi)
    sim = SimulatorControl(lib)
    sim.set("token_delay_ms", 1)
    with tempfile.TemporaryDirectory() as tmp:
        make_model(tmp, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
        make_model(tmp, "gemma-3-1b-it_w8a8.rkllm", think=False)
        manager = ModelManager(ModelRegistry([Path(tmp)], platform=None), library=lib, max_loaded=2)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(manager), port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}"
        errors, samples, wall = asyncio.run(load(base, args.requests, args.concurrency))
        sim.set("token_delay_ms", args.pace_ms)
        ways = asyncio.run(overhead(base, manager, args.runs, args.count))
        server.should_exit = True
        thread.join(30)
        manager.close()
    first, last = samples[0][1], samples[-1][1]
    mid = samples[len(samples) // 2][1]
    print(f"machine: {machine()}; ABI {args.abi}")
    print(
        f"{args.requests} streaming requests (half OpenAI SSE, half Ollama NDJSON), {args.concurrency} at a time "
        f"over two models: {wall:.1f} s, {errors} errors"
    )
    print(f"RSS after the first wave {first:.1f} MB, halfway {mid:.1f} MB, at the end {last:.1f} MB")
    print(
        f"simulator: live handles {sim.counter('live_handles')}, overlapping runs "
        f"{sim.counter('concurrent_run_violations')}, destroys while running {sim.counter('destroy_while_running')}, "
        f"inits {sim.counter('inits')}"
    )
    base_ttft, base_rate = ways["in-process"]
    print(f"one request at a time, {args.pace_ms:g} ms/token, medians of {args.runs}:")
    print(f"  in-process: time to first token {base_ttft:.1f} ms, decode {base_rate:.2f} tokens/s")
    for name in ("SSE", "NDJSON"):
        ttft, rate = ways[name]
        print(
            f"  {name}: time to first token {ttft:.1f} ms ({ttft - base_ttft:+.1f} ms over in-process), "
            f"decode {rate:.2f} tokens/s ({rate / base_rate:.3f} of in-process)"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
