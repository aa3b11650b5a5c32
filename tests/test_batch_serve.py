"""rkllm serve with batched decoding: concurrent HTTP clients share runs, each gets its own answer."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.serve import ServerSettings, create_app  # noqa: E402
from rkllm_core.serve.run import add_arguments  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"


@pytest.fixture
def manager(model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ModelManager]:
    make_model(model_dir, QWEN)
    sim.set("batch_step_cost", 0.15)
    sim.set("token_delay_ms", 5)  # runs long enough that late arrivals gather for the next one
    m = ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, max_loaded=1, n_batch=4)
    yield m
    m.close()
    assert sim.counter("batch_refusals") == 0


def test_n_batch_flag_parses_and_refuses_out_of_range() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--n-batch", "4"]).n_batch == 4
    assert parser.parse_args([]).n_batch is None
    for bad in ("0", "101", "four"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--n-batch", bad])


def test_concurrent_http_clients_share_batched_runs(manager: ModelManager, sim: SimulatorControl) -> None:
    app = create_app(manager, ServerSettings(board="b"))

    async def ask(http: httpx.AsyncClient, i: int, stream: bool) -> str:
        body: dict[str, Any] = {
            "model": "qwen3-0.6b",
            "messages": [{"role": "user", "content": f"client {i} speaking"}],
            "stream": stream,
        }
        if not stream:
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["message"]["content"])
        text = ""
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"]
                    if delta:
                        text += delta[0]["delta"].get("content") or ""
        return text

    async def main() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await asyncio.gather(*(ask(http, i, i % 2 == 0) for i in range(8)))

    answers = asyncio.run(main())
    assert answers == [f"Echo: client {i} speaking — ok." for i in range(8)]
    assert 2 <= sim.counter("batched_runs") < 8  # shared, not one run per request
    assert sim.counter("runs") == sim.counter("batched_runs")
