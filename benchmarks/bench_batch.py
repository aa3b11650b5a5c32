"""Batched decoding (``n_batch``) on the simulator: what N slots in one run buy over single runs.

For N = 1, 2, 4, 8 slots (a handle made with ``InitParams(n_batch=N)``, N prompts in
one :meth:`RKLLMRuntime.batch` run, every slot read by a thread of its own) it reports
aggregate tokens/s, per-slot tokens/s and time to first token, and compares N = 4 with
4 sequential single runs on an ``n_batch=1`` handle.

The simulator's cost model is an assumption (documented in ``rkllm_sim.c``): a decode
step costs ``token_delay_ms * (1 + batch_step_cost * (active slots - 1))``, so with the
default 0.15 the expected N = 4 ratio is 4 / 1.45 = 2.76x. What a board gives is
unknown until measured there; the same script runs against a real runtime with
``--lib /usr/lib/librkllmrt.so --model model.rkllm`` (then the simulator settings are
not applied). Wall-clock numbers from shared machines are indicative; the ratio is the
result.

With ``--clients C`` (default 8) it then measures what requests see through the chat
engine: C concurrent streaming clients (asyncio tasks, one single-turn request each)
against a model served unbatched (``n_batch`` off: one request at a time, the
manager's line) and with ``n_batch = N`` for each N (the batch scheduler gathers
them): aggregate tokens/s, per-client tokens/s, time to first token p50/p95, and the
prefill tokens spent (the simulator's counter). The target on the simulator's cost
model: aggregate tokens/s at N = 4 with 8 clients >= 2.5x unbatched, TTFT p95 <= 2x.

Usage: python benchmarks/bench_batch.py [--abi 1.3] [--token-ms 25] [--tokens 48] [--repeat 3]
       [--clients 8] [--engine-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_core import machine

from rkllm_core.chat.engine import ChatEngine, TextDelta
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.options import ChatOptions
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary, load_library
from rkllm_core.params import InitParams
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.runtime.batch import BatchSlot
from rkllm_core.sim import SimulatorControl, build_simulator, make_model
from rkllm_core.tools.bench_concurrency import ConcurrencyPoint, percentile


@dataclass
class Point:
    """One configuration's median over the repeats."""

    label: str
    slots: int
    tokens: int
    seconds: float
    aggregate_tps: float
    per_slot_tps: float
    ttft_ms: float


def read_slot(slot: BatchSlot, t0: float, out: dict[int, tuple[float, float, int]]) -> None:
    """Read one slot to its end; record (first token time, end time, tokens)."""
    first = 0.0
    for chunk in slot:
        if chunk.text and not first:
            first = time.perf_counter() - t0
    out[slot.index] = (first, time.perf_counter() - t0, slot.tokens)


def batched_once(rt: RKLLMRuntime, n: int, tokens: int) -> tuple[float, list[tuple[float, float, int]]]:
    """One batched run of n prompts, each generating `tokens` tokens; returns (wall s, per-slot figures)."""
    prompts = [f"count to {5000 + i}" for i in range(n)]
    done: dict[int, tuple[float, float, int]] = {}
    t0 = time.perf_counter()
    with rt.batch(prompts, max_new_tokens=tokens) as run:
        threads = [threading.Thread(target=read_slot, args=(s, t0, done)) for s in run.slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        run.wait(60)
    return time.perf_counter() - t0, [done[i] for i in range(n)]


def sequential_once(rt: RKLLMRuntime, n: int, tokens: int) -> tuple[float, int, float]:
    """n single runs one after another; returns (wall s, tokens, mean TTFT s)."""
    total, ttfts = 0, []
    t0 = time.perf_counter()
    for i in range(n):
        start = time.perf_counter()
        first = 0.0
        with rt.stream(f"count to {5000 + i}", max_new_tokens=tokens) as stream:
            for chunk in stream:
                if chunk.text and not first:
                    first = time.perf_counter() - start
            total += stream.tokens
        ttfts.append(first)
    return time.perf_counter() - t0, total, statistics.mean(ttfts)


def measure_batched(lib: RuntimeLibrary, model: Path, n: int, tokens: int, repeat: int) -> Point:
    with RKLLMRuntime(model, params=InitParams(n_batch=n), library=lib) as rt:
        runs = [batched_once(rt, n, tokens) for _ in range(repeat)]
    wall, slots = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    total = sum(s[2] for s in slots)
    per_slot = statistics.mean(s[2] / s[1] for s in slots)
    return Point(f"batched N={n}", n, total, wall, total / wall, per_slot, 1000 * statistics.mean(s[0] for s in slots))


def measure_sequential(lib: RuntimeLibrary, model: Path, n: int, tokens: int, repeat: int) -> Point:
    with RKLLMRuntime(model, params=InitParams(n_batch=1), library=lib) as rt:
        runs = [sequential_once(rt, n, tokens) for _ in range(repeat)]
    wall, total, ttft = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return Point(f"{n} sequential single runs", 1, total, wall, total / wall, total / wall, 1000 * ttft)


async def client(engine: ChatEngine, model: str, i: int, tokens: int, t0: float) -> tuple[float, float, int]:
    """One streaming request; returns (TTFT s, end s, output tokens)."""
    first = 0.0
    out = 0
    opts = ChatOptions(max_new_tokens=tokens)
    async for event in engine.astream(model, [ChatMessage("user", f"count to {5000 + i}")], opts):
        if isinstance(event, TextDelta) and not first:
            first = time.perf_counter() - t0
        elif not isinstance(event, TextDelta):
            out = getattr(getattr(event, "usage", None), "output_tokens", out)
    return first, time.perf_counter() - t0, out


def measure_engine(
    lib: RuntimeLibrary, model_file: Path, n_batch: int | None, clients: int, tokens: int, ctl: SimulatorControl | None
) -> ConcurrencyPoint:
    """C clients at once through a ChatEngine whose manager loads the model with ``n_batch``."""
    registry = ModelRegistry([model_file.parent], platform=None)
    manager = ModelManager(registry, library=lib, max_loaded=1, n_batch=n_batch)
    engine = ChatEngine(manager, prompt_cache=False)
    model = next(m.name for m in registry.models() if m.path.resolve() == model_file.resolve())
    try:
        engine.chat(model, [ChatMessage("user", "warm up")], ChatOptions(max_new_tokens=2))  # load outside the clock
        before = ctl.counter("prefilled_tokens") if ctl is not None else 0

        async def everyone() -> list[tuple[float, float, int]]:
            t0 = time.perf_counter()
            return await asyncio.gather(*(client(engine, model, i, tokens, t0) for i in range(clients)))

        t0 = time.perf_counter()
        results = asyncio.run(everyone())
        wall = time.perf_counter() - t0
        prefill = (ctl.counter("prefilled_tokens") - before) if ctl is not None else -1
    finally:
        manager.close()
    total = sum(r[2] for r in results)
    ttfts = [1000 * r[0] for r in results]
    label = f"engine, n_batch={n_batch}" if n_batch else "engine, unbatched"
    return ConcurrencyPoint(
        label,
        n_batch or 1,
        clients,
        total,
        wall,
        total / wall,
        statistics.mean(r[2] / r[1] for r in results),
        percentile(ttfts, 50),
        percentile(ttfts, 95),
        prefill,
    )


def report_engine(points: list[ConcurrencyPoint]) -> tuple[float, float]:
    """Print the engine table; return (aggregate ratio, TTFT p95 ratio) of N=4 against unbatched."""
    print(
        "\n| clients through the chat engine | clients | tokens | wall s | aggregate tok/s | per-client tok/s "
        "| TTFT p50 ms | TTFT p95 ms | prefill tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in points:
        print(
            f"| {p.label} | {p.clients} | {p.tokens} | {p.seconds:.2f} | {p.aggregate_tps:.1f} | "
            f"{p.per_client_tps:.1f} | {p.ttft_p50_ms:.0f} | {p.ttft_p95_ms:.0f} | {p.prefill_tokens} |"
        )
    base = points[0]
    four = next((p for p in points[1:] if p.n_batch == 4), None)
    if four is None:
        return float("nan"), float("nan")
    agg, ttft = four.aggregate_tps / base.aggregate_tps, four.ttft_p95_ms / base.ttft_p95_ms
    print(f"\nN=4 with {four.clients} clients vs unbatched: {agg:.2f}x aggregate tokens/s, TTFT p95 {ttft:.2f}x")
    return agg, ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    ap.add_argument("--lib", help="a real librkllmrt.so instead of the simulator")
    ap.add_argument("--model", help="the .rkllm file (default: a simulator model)")
    ap.add_argument("--token-ms", type=float, default=25.0, help="simulator: ms per decode step of one slot")
    ap.add_argument("--prefill-ms", type=float, default=0.0, help="simulator: ms per prefilled token")
    ap.add_argument("--step-cost", type=float, default=0.15, help="simulator: extra step cost per extra slot")
    ap.add_argument("--tokens", type=int, default=48, help="tokens each slot generates")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients through the chat engine")
    ap.add_argument("--engine-only", action="store_true", help="skip the raw runtime comparison")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    lib = load_library(args.lib or build_simulator(args.abi), args.abi if not args.lib else None)
    model = Path(args.model) if args.model else make_model(tempfile.mkdtemp(prefix="bench-batch-"))
    ctl: SimulatorControl | None = None
    if lib.is_simulator:
        ctl = SimulatorControl(lib.path)
        for key, value in (
            ("banner", 0),
            ("token_delay_ms", args.token_ms),
            ("prefill_ms_per_token", args.prefill_ms),
            ("batch_step_cost", args.step_cost),
        ):
            ctl.set(key, value)

    sizes = [int(n) for n in args.sizes.split(",")]
    where = "simulator" if lib.is_simulator else f"runtime {lib.path}"
    print(f"Machine: {machine()}; {where}, ABI {lib.abi}")
    if lib.is_simulator:
        expected = 4 / (1 + args.step_cost * 3)
        print(f"Simulator pace: {args.token_ms} ms/step, step cost +{args.step_cost:.0%} per extra slot")
        print(f"{args.tokens} tokens per slot, median of {args.repeat}; expected N=4 ratio {expected:.2f}x\n")
    report: dict[str, object] = {"machine": machine(), "abi": lib.abi, "simulator": lib.is_simulator}
    if not args.engine_only:
        points = [measure_batched(lib, model, n, args.tokens, args.repeat) for n in sizes]
        sequential = measure_sequential(lib, model, 4, args.tokens, args.repeat)
        four = next((p for p in points if p.slots == 4), None)
        ratio = four.aggregate_tps / sequential.aggregate_tps if four else float("nan")
        print("| configuration | tokens | wall s | aggregate tok/s | per-slot tok/s | TTFT ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for p in [*points, sequential]:
            row = f"| {p.label} | {p.tokens} | {p.seconds:.2f} | {p.aggregate_tps:.1f} | {p.per_slot_tps:.1f} |"
            print(f"{row} {p.ttft_ms:.0f} |")
        print(f"\nN=4 batched vs 4 sequential single runs: {ratio:.2f}x aggregate tokens/s")
        report.update(ratio_n4=ratio, points=[asdict(p) for p in [*points, sequential]])
    if args.clients > 0:
        engine_points = [measure_engine(lib, model, None, args.clients, args.tokens, ctl)]
        engine_points += [measure_engine(lib, model, n, args.clients, args.tokens, ctl) for n in sizes if n > 1]
        agg, ttft = report_engine(engine_points)
        report.update(engine_ratio_n4=agg, engine_ttft_p95_ratio_n4=ttft, engine=[asdict(p) for p in engine_points])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
