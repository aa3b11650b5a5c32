"""``rkllm bench --concurrency C [--n-batch N]``: concurrent streaming clients through the chat engine.

C clients (asyncio tasks) each stream one single-turn request of ``new_tokens`` tokens at
once, first against the model served unbatched (one request at a time), then with
``n_batch = N`` (the batch scheduler gathers them into shared runs; see
:mod:`rkllm_core.runtime.scheduler`). Reported per configuration: aggregate tokens/s,
mean per-client tokens/s, time to first token p50 and p95 (wall clock from the common
start), and the input tokens prefilled (from the requests' usage).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..chat.engine import ChatDone, ChatEngine, TextDelta
from ..chat.messages import ChatMessage
from ..chat.options import ChatOptions
from ..models.manager import ModelManager
from ..models.registry import ModelRegistry

__all__ = ["ConcurrencyPoint", "percentile", "run_concurrency", "to_table"]


@dataclass(frozen=True)
class ConcurrencyPoint:
    """One configuration's figures."""

    label: str
    n_batch: int
    clients: int
    tokens: int
    seconds: float
    aggregate_tps: float
    per_client_tps: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    prefill_tokens: int


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, by linear interpolation."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def _client(engine: ChatEngine, model: str, i: int, new_tokens: int, t0: float) -> tuple[float, float, int, int]:
    """One streaming request; returns (TTFT s, end s, output tokens, prefilled tokens)."""
    first, out, prefilled = 0.0, 0, 0
    msgs = [ChatMessage("user", f"Client {i}: write a long story about the number {i}.")]
    async for event in engine.astream(model, msgs, ChatOptions(max_new_tokens=new_tokens)):
        if isinstance(event, TextDelta) and not first:
            first = time.perf_counter() - t0
        elif isinstance(event, ChatDone):
            out, prefilled = event.usage.output_tokens, event.usage.prefilled_tokens
    return first, time.perf_counter() - t0, out, prefilled


def _measure(
    registry: ModelRegistry, lib: Any, model: str, n_batch: int | None, clients: int, new_tokens: int
) -> ConcurrencyPoint:
    with ModelManager(registry, library=lib, n_batch=n_batch) as manager:
        engine = ChatEngine(manager, prompt_cache=False)
        engine.chat(model, [ChatMessage("user", "warm up")], ChatOptions(max_new_tokens=2))  # load off the clock

        async def everyone() -> list[tuple[float, float, int, int]]:
            t0 = time.perf_counter()
            return list(await asyncio.gather(*(_client(engine, model, i, new_tokens, t0) for i in range(clients))))

        t0 = time.perf_counter()
        results = asyncio.run(everyone())
        wall = time.perf_counter() - t0
    total = sum(r[2] for r in results)
    ttfts = [1000 * r[0] for r in results]
    return ConcurrencyPoint(
        f"n_batch={n_batch}" if n_batch else "unbatched",
        n_batch or 1,
        clients,
        total,
        wall,
        total / wall if wall > 0 else 0.0,
        sum(r[2] / r[1] for r in results if r[1] > 0) / len(results),
        percentile(ttfts, 50),
        percentile(ttfts, 95),
        sum(r[3] for r in results),
    )


def run_concurrency(
    registry: ModelRegistry, lib: Any, model: str, n_batches: list[int], clients: int, new_tokens: int
) -> list[ConcurrencyPoint]:
    """Measure ``clients`` concurrent streams unbatched, then for each ``n_batch`` > 1 in ``n_batches``."""
    points = [_measure(registry, lib, model, None, clients, new_tokens)]
    points += [_measure(registry, lib, model, n, clients, new_tokens) for n in n_batches if n > 1]
    return points


def to_table(points: list[ConcurrencyPoint]) -> str:
    """The points as a markdown table, with each batched point's ratio to the unbatched one."""
    lines = [
        "| configuration | clients | tokens | wall s | aggregate tok/s | per-client tok/s | TTFT p50 ms "
        "| TTFT p95 ms | prefill tokens | aggregate vs unbatched | TTFT p95 vs unbatched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = points[0]
    for p in points:
        agg = p.aggregate_tps / base.aggregate_tps if base.aggregate_tps else float("nan")
        ttft = p.ttft_p95_ms / base.ttft_p95_ms if base.ttft_p95_ms else float("nan")
        lines.append(
            f"| {p.label} | {p.clients} | {p.tokens} | {p.seconds:.2f} | {p.aggregate_tps:.1f} | "
            f"{p.per_client_tps:.1f} | {p.ttft_p50_ms:.0f} | {p.ttft_p95_ms:.0f} | {p.prefill_tokens} | "
            f"{agg:.2f}x | {ttft:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def as_json(points: list[ConcurrencyPoint]) -> list[dict[str, Any]]:
    """The points as plain dicts."""
    return [asdict(p) for p in points]
