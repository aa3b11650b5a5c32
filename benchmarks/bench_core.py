"""Overhead of the core binding, measured on the simulator.

Reports, as ratios within one run (the machine is noted; wall-clock numbers
from shared machines are only indicative):

* throughput through ``RKLLMRuntime.stream`` against the raw callback rate
  (a bare ctypes callback that only counts) at zero token delay;
* latency added per token at a paced 40 tok/s;
* model-manager swap overhead beyond the runtime's own init/destroy time,
  and re-inits for repeated same-model requests.

Usage: python benchmarks/bench_core.py [--abi 1.3] [--tokens 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.functions import abi_module
from rkllm_core.native.library import load_library
from rkllm_core.native.structs import LLMHandle, LLMResultCallback
from rkllm_core.params import InitParams
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.sim import SimulatorControl, build_simulator, make_model


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def raw_run_seconds(lib_path: Path, model: Path, prompt: str) -> tuple[float, int]:
    """Time one run through a bare counting callback (no queue, no decoding)."""
    lib = load_library(lib_path)
    fns, m = lib.functions, abi_module(lib.abi)
    count = 0

    def cb(result: int, userdata: int, state: int) -> int:
        nonlocal count
        if state == 0:
            count += 1
        return 0

    c_cb = LLMResultCallback(cb)
    param = fns.rkllm_createDefaultParam()
    path = os.fsencode(model)
    param.model_path = path
    param.max_context_len = 0
    handle = LLMHandle()
    if lib.abi == "1.3":
        cbs = m.RKLLMCallback()
        cbs.result_callback = c_cb
        rc = fns.rkllm_init(ctypes.byref(handle), ctypes.byref(param), ctypes.byref(cbs))
    else:
        rc = fns.rkllm_init(ctypes.byref(handle), ctypes.byref(param), c_cb)
    assert rc == 0
    inp = m.RKLLMInput()
    inp.role, inp.input_type, inp.prompt_input = b"user", 0, prompt.encode()
    infer = m.RKLLMInferParam()
    t0 = time.perf_counter()
    fns.rkllm_run(handle, ctypes.byref(inp), ctypes.byref(infer), None)
    elapsed = time.perf_counter() - t0
    fns.rkllm_destroy(handle)
    return elapsed, count


def stream_run_seconds(rt: RKLLMRuntime, prompt: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for chunk in rt.stream(prompt):
        n += chunk.n_tokens  # tokens, not chunks: a chunk may carry several when the consumer lags
    return time.perf_counter() - t0, n


def median_of(fn, repeat: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    results = [fn() for _ in range(repeat)]
    return statistics.median(r[0] for r in results), results[0][1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    ap.add_argument("--tokens", type=int, default=12000, help="tokens per throughput run")
    ap.add_argument("--paced-tokens", type=int, default=80, help="tokens per paced (40 tok/s) run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--swaps", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    lib_path = build_simulator(args.abi)
    sim = SimulatorControl(lib_path)
    sim.set("banner", 0)
    tmp = Path(tempfile.mkdtemp())
    model = make_model(tmp, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm")
    # "count to N" yields about two tokens per number.
    prompt = f"count to {args.tokens // 2}"
    results: dict[str, object] = {"machine": machine(), "abi": args.abi}

    # 1. throughput at zero token delay
    sim.set("token_delay_ms", 0)
    # Raw and core runs alternate, and the ratio is taken per pair, so drifts in machine load
    # hit both sides alike.
    full = InitParams(max_context_len=16384)
    raw_rates, core_rates = [], []
    with RKLLMRuntime(model, params=full, library=lib_path) as rt:
        rt.generate("warm up")
        for _ in range(args.repeat):
            raw_s, raw_n = raw_run_seconds(lib_path, model, prompt)
            core_s, core_n = stream_run_seconds(rt, prompt)
            raw_rates.append(raw_n / raw_s)
            core_rates.append(core_n / core_s)
    results["raw_tokens_per_s"] = statistics.median(raw_rates)
    results["core_tokens_per_s"] = statistics.median(core_rates)
    results["core_vs_raw"] = statistics.median(c / r for c, r in zip(core_rates, raw_rates, strict=True))
    results["tokens_per_run"] = raw_n

    # 2. latency added per token at 40 tok/s
    sim.set("token_delay_ms", 25)
    paced_prompt = f"count to {args.paced_tokens // 2}"
    raw_p, raw_pn = median_of(lambda: raw_run_seconds(lib_path, model, paced_prompt), 3)
    with RKLLMRuntime(model, params=full, library=lib_path) as rt:
        core_p, _ = median_of(lambda: stream_run_seconds(rt, paced_prompt), 3)
    results["paced_tokens"] = raw_pn
    results["added_ms_per_token_at_40tps"] = max(0.0, (core_p - raw_p) * 1000 / raw_pn)
    sim.set("token_delay_ms", 0)

    # 3. swap overhead and re-inits
    d = tmp / "swap"
    make_model(d, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
    make_model(d, "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
    sim.set("init_delay_ms", 20)
    sim.set("destroy_delay_ms", 5)
    init_destroy = []
    for _ in range(5):
        t0 = time.perf_counter()
        RKLLMRuntime(d / "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm", library=lib_path).close()
        init_destroy.append(time.perf_counter() - t0)
    base = statistics.median(init_destroy)
    with ModelManager(ModelRegistry([d], platform=None), library=lib_path, max_loaded=1) as mgr:
        with mgr.lease("qwen3-0.6b"):
            pass
        swaps = []
        for i in range(args.swaps):
            name = "gemma3-270m" if i % 2 == 0 else "qwen3-0.6b"
            t0 = time.perf_counter()
            with mgr.lease(name):
                pass
            swaps.append(time.perf_counter() - t0)
        sim.reset()
        for _ in range(100):
            with mgr.lease("qwen3-0.6b"):
                pass
        reinits = sim.counter("inits")
    results["init_plus_destroy_ms"] = base * 1000
    results["swap_ms"] = statistics.median(swaps) * 1000
    results["swap_overhead_ms"] = (statistics.median(swaps) - base) * 1000
    results["reinits_for_100_repeated_requests"] = reinits
    sim.set("init_delay_ms", 0)
    sim.set("destroy_delay_ms", 0)

    # 4. 32 concurrent requests on one model: does the NPU ever idle while work is queued?
    # Paced like a small model on a board: 1 ms per prompt token, 10 ms per generated token.
    sim.set("token_delay_ms", 10)
    sim.set("prefill_ms_per_token", 1)
    with ModelManager(ModelRegistry([d], platform=None), library=lib_path, max_loaded=1) as mgr:
        engine = ChatEngine(mgr, prompt_cache=False)
        engine.chat("qwen3-0.6b", [ChatMessage("user", "warm up")])
        sim.reset()
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                engine.chat("qwen3-0.6b", [ChatMessage("user", f"request {i}: count to 10")])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        busy = sim.counter("busy_ns") / 1e9
    assert not errors, errors[:1]
    results["concurrent_32_wall_s"] = wall
    results["concurrent_32_busy_s"] = busy
    results["concurrent_32_wall_over_busy"] = wall / busy
    sim.set("token_delay_ms", 0)
    sim.set("prefill_ms_per_token", 0)

    # 5. import time of rkllm_core (fresh interpreter, median of 7)
    code = "import time; t=time.perf_counter(); import rkllm_core; print(time.perf_counter()-t)"
    times = [
        float(
            subprocess.run(
                [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(7)
    ]
    check = (
        "import sys, rkllm_core; print(any(m.split('.')[0] in ('langchain_core','llama_index') for m in sys.modules))"
    )
    frameworks = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout.strip()
    results["import_ms"] = statistics.median(times) * 1000
    results["import_pulls_frameworks"] = frameworks == "True"

    print(f"machine: {results['machine']} (simulator, ABI {args.abi})")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| raw callback rate | {results['raw_tokens_per_s']:,.0f} tok/s | |")
    print(
        f"| core stream (`RKLLMRuntime.stream`) | {results['core_tokens_per_s']:,.0f} tok/s "
        f"({results['core_vs_raw']:.2f} of raw) | >= 0.9 of raw |"
    )
    print(f"| latency added per token at 40 tok/s | {results['added_ms_per_token_at_40tps']:.3f} ms | <= 0.25 ms |")
    print(
        f"| swap (unload + load) | {results['swap_ms']:.1f} ms, of which runtime init+destroy "
        f"{results['init_plus_destroy_ms']:.1f} ms | |"
    )
    print(f"| swap overhead beyond init+destroy | {results['swap_overhead_ms']:.2f} ms | <= 5 ms |")
    print(f"| re-inits for 100 repeated same-model requests | {reinits} | 0 |")
    print(
        f"| 32 concurrent requests: wall ÷ runtime busy time | {results['concurrent_32_wall_over_busy']:.3f} "
        f"({wall:.2f} s / {busy:.2f} s) | <= 1.05 |"
    )
    print(
        f"| `import rkllm_core` | {results['import_ms']:.1f} ms (frameworks imported: "
        f"{results['import_pulls_frameworks']}) | <= 50 ms, none |"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
