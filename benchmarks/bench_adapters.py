"""Overhead of the framework adapters, measured on the simulator.

Tokens per second through ``ChatRKLLM.stream`` (LangChain) and ``RKLLM.stream_chat``
(LlamaIndex) against the raw callback rate at zero token delay, and the latency
each adds per token at a paced 40 tok/s. Raw and adapter runs alternate and the
ratio is taken per pair, so load drifts hit both sides.

Usage: python benchmarks/bench_adapters.py [--abi 1.3] [--tokens 12000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_core import machine, raw_run_seconds

from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.sim import SimulatorControl, build_simulator, make_model

FILENAME = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm"


def langchain_runner(manager: ModelManager) -> Callable[[str], tuple[float, int]]:
    from langchain_rkllm import ChatRKLLM

    model = ChatRKLLM(model="qwen3-0.6b", manager=manager)

    def run(prompt: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        usage = 0
        for chunk in model.stream(prompt):
            if chunk.usage_metadata:
                usage = chunk.usage_metadata["output_tokens"]
        return time.perf_counter() - t0, usage

    return run


def llamaindex_runner(manager: ModelManager) -> Callable[[str], tuple[float, int]]:
    from llama_index.core.llms import ChatMessage

    from llamaindex_rkllm import RKLLM

    llm = RKLLM(model="qwen3-0.6b", manager=manager)

    def run(prompt: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        last = None
        for response in llm.stream_chat([ChatMessage(role="user", content=prompt)]):
            last = response
        assert last is not None
        usage = (last.raw or {}).get("usage", {}).get("completion_tokens", 0)
        return time.perf_counter() - t0, int(usage)

    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    ap.add_argument("--tokens", type=int, default=12000)
    ap.add_argument("--paced-tokens", type=int, default=80)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lib = build_simulator(args.abi)
    sim = SimulatorControl(lib)
    sim.set("banner", 0)
    tmp = Path(tempfile.mkdtemp())
    model = make_model(tmp, FILENAME)
    results: dict[str, object] = {"machine": machine(), "abi": args.abi}
    prompt = f"count to {args.tokens // 2}"
    paced = f"count to {args.paced_tokens // 2}"
    rows = []
    with ModelManager(ModelRegistry([tmp], platform=None), library=lib) as manager:
        for name, make in (("ChatRKLLM.stream", langchain_runner), ("RKLLM.stream_chat", llamaindex_runner)):
            run = make(manager)
            run("warm up")
            sim.set("token_delay_ms", 0)
            ratios, rates = [], []
            for _ in range(args.repeat):
                raw_s, raw_n = raw_run_seconds(lib, model, prompt)
                s, n = run(prompt)
                rates.append(n / s)
                ratios.append((n / s) / (raw_n / raw_s))
            sim.set("token_delay_ms", 25)
            raw_runs = [raw_run_seconds(lib, model, paced) for _ in range(3)]
            raw_p, raw_pn = statistics.median(r[0] for r in raw_runs), raw_runs[0][1]
            adapter_p = statistics.median(run(paced)[0] for _ in range(3))
            sim.set("token_delay_ms", 0)
            added = max(0.0, (adapter_p - raw_p) * 1000 / raw_pn)
            rows.append((name, statistics.median(rates), statistics.median(ratios), added))
            results[name] = {"tokens_per_s": rows[-1][1], "vs_raw": rows[-1][2], "added_ms_per_token_at_40tps": added}
    print(f"machine: {results['machine']} (simulator, ABI {args.abi})")
    print("| path | tok/s at zero delay | ÷ raw callback rate | added per token at 40 tok/s |")
    print("|---|---|---|---|")
    for name, rate, ratio, added in rows:
        print(f"| `{name}` | {rate:,.0f} | {ratio:.2f} (goal ≥ 0.5) | {added:.3f} ms (goal ≤ 0.25) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
