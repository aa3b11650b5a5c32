"""What the default budget saves: an app with a chat and an embedding model, as the frameworks' docs write one.

The app alternates ``RKLLMEmbeddings.embed_query`` and ``ChatRKLLM.invoke`` under the default manager
(no ``manager=`` anywhere), in a fresh process per variant:

* ``auto``: the default budget (as many models as fit in the memory available);
* ``one``: ``RKLLM_MAX_LOADED=1``, the budget every app had before.

Paced like a board: a model load takes ``--init-ms`` and a token ``--token-ms`` on the simulator.
Reported: wall time, model loads (``rkllm_init`` calls), and the ratio one/auto.

Usage: python benchmarks/bench_budget.py [--abi 1.3] [--calls 10] [--init-ms 1500] [--token-ms 25]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_core import machine

CHAT = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"


def child(calls: int) -> None:
    """The app: what a user writes after reading the LangChain docs."""
    from langchain_rkllm import ChatRKLLM, RKLLMEmbeddings
    from rkllm_core.sim import SimulatorControl

    llm = ChatRKLLM(model="qwen3-0.6b", max_tokens=16)
    embeddings = RKLLMEmbeddings(model="qwen3-embedding-0.6b")
    t0 = time.perf_counter()
    for i in range(calls):
        embeddings.embed_query(f"question {i}")
        llm.invoke(f"question {i}")
    wall = time.perf_counter() - t0
    inits = SimulatorControl(os.environ["RKLLM_LIB_PATH"]).counter("inits")
    print(json.dumps({"wall_s": wall, "inits": inits}))


def run(variant: str, args: argparse.Namespace, lib: Path, models: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLM_")}
    env.update(
        RKLLM_LIB_PATH=str(lib),
        RKLLM_MODEL_DIR=str(models),
        RKLLM_SIM_INIT_DELAY_MS=str(args.init_ms),
        RKLLM_SIM_TOKEN_DELAY_MS=str(args.token_ms),
    )
    if variant == "one":
        env["RKLLM_MAX_LOADED"] = "1"
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(args.calls)], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--init-ms", type=int, default=1500)
    parser.add_argument("--token-ms", type=int, default=25)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    from rkllm_core.sim import build_simulator, make_model

    lib = build_simulator(args.abi)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        make_model(models, CHAT, size_mb=890)
        make_model(models, EMBED, size_mb=640)
        results = {variant: run(variant, args, lib, models) for variant in ("auto", "one")}
    print(
        f"# default budget vs one model at a time ({machine()}; simulator {args.abi}, "
        f"load {args.init_ms} ms, {args.token_ms} ms/token, {args.calls} embed+chat pairs)\n"
    )
    print("| budget | wall s | model loads |\n|---|---:|---:|")
    for variant, label in (("auto", "default (what fits)"), ("one", "RKLLM_MAX_LOADED=1")):
        r = results[variant]
        print(f"| {label} | {r['wall_s']:.2f} | {r['inits']} |")
    print(f"\none model at a time takes {results['one']['wall_s'] / results['auto']['wall_s']:.1f}x as long")


if __name__ == "__main__":
    main()
