"""Load on `rkllm serve` (simulator): many concurrent streaming clients, errors, and memory over time.

A server on a real socket (uvicorn in a thread, the app from ``rkllm_core.serve``) with two chat
models; ``--requests`` streaming chat requests in waves of ``--concurrency``, alternating models;
the process RSS after each wave, and at the end the simulator's handle and violation counters.

Usage: python benchmarks/bench_serve.py [--requests 1000] [--concurrency 64] [--abi 1.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from bench_core import machine

from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.serve import create_app
from rkllm_core.sim import SimulatorControl, build_simulator, make_model


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(client: httpx.AsyncClient, i: int) -> tuple[bool, str]:
    model = "qwen3-0.6b" if i % 2 else "gemma3-1b"
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"request {i}"}]}
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return False, f"{response.status_code}"
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    text.append(choice["delta"].get("content") or "")
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
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
        errors, samples, wall = asyncio.run(load(f"http://127.0.0.1:{port}", args.requests, args.concurrency))
        server.should_exit = True
        thread.join(30)
        manager.close()
    first, last = samples[0][1], samples[-1][1]
    mid = samples[len(samples) // 2][1]
    print(f"machine: {machine()}; ABI {args.abi}")
    print(
        f"{args.requests} streaming requests, {args.concurrency} at a time over two models: "
        f"{wall:.1f} s, {errors} errors"
    )
    print(f"RSS after the first wave {first:.1f} MB, halfway {mid:.1f} MB, at the end {last:.1f} MB")
    print(
        f"simulator: live handles {sim.counter('live_handles')}, overlapping runs "
        f"{sim.counter('concurrent_run_violations')}, destroys while running {sim.counter('destroy_while_running')}, "
        f"inits {sim.counter('inits')}"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
