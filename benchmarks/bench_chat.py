"""Prefill the chat engine saves, measured with the simulator's counters.

* A 10-turn conversation replayed the way LangChain and LlamaIndex call a chat
  model (the full history on every call): tokens prefilled ÷ the conversation's
  unique tokens (its final KV-cache size), with KV reuse and without (naive).
* A ~1,000-token system prompt: the prefill a second process saves thanks to
  the prompt cache on disk.

Usage: python benchmarks/bench_chat.py [--abi 1.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.sim import SimulatorControl, build_simulator, make_model

MODELS = {
    "qwen3-0.6b": "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm",  # template rendered by the engine
    "gemma3-1b": "gemma-3-1b-it_w8a8-ctx16384.rkllm",  # built-in template path
}
SYSTEM = " ".join(f"Rule {i}: answer politely and cite section {i} of the manual." for i in range(75))


def replay(engine: ChatEngine, sim: SimulatorControl, model: str, turns: int = 10) -> tuple[int, int]:
    sim.reset()
    history = [ChatMessage("system", "You are a helpful assistant. Answer in one or two sentences.")]
    for t in range(turns):
        history.append(ChatMessage("user", f"Turn {t}: tell me something about the number {t * 7}, briefly please."))
        history.append(engine.chat(model, history).message)
    with engine.manager.lease(model) as lease:
        unique = lease.runtime.kv_cache_size()
    return sim.counter("prefilled_tokens"), unique


CHILD = """
import json, sys
from rkllm_core.chat.engine import ChatEngine
from rkllm_core.models.manager import ModelManager
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.promptcache import PromptCacheStore
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.sim import SimulatorControl
lib, models, cache, system, q = sys.argv[1:6]
sim = SimulatorControl(lib); sim.set("banner", 0)
with ModelManager(ModelRegistry([models], platform=None), library=lib) as m:
    r = ChatEngine(m, prompt_cache=PromptCacheStore(cache)).chat(
        "qwen3-0.6b", [ChatMessage("system", system), ChatMessage("user", q)])
print(json.dumps({"prefilled": r.usage.prefilled_tokens, "input": r.usage.input_tokens}))
"""


def restart(lib: Path, models: Path, cache: Path, question: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(lib), str(models), str(cache), SYSTEM, question],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lib = build_simulator(args.abi)
    sim = SimulatorControl(lib)
    sim.set("banner", 0)
    tmp = Path(tempfile.mkdtemp())
    for filename in MODELS.values():
        make_model(tmp, filename, think=False)
    results: dict[str, object] = {"abi": args.abi}
    print("| model | path | prefilled ÷ unique tokens, KV reuse | naive (full history every turn) |")
    print("|---|---|---|---|")
    for model in MODELS:
        row = []
        for reuse in (True, False):
            with ModelManager(ModelRegistry([tmp], platform=None), library=lib) as m:
                prefilled, unique = replay(ChatEngine(m, prompt_cache=False, reuse_kv=reuse), sim, model)
            row.append(prefilled / unique)
        path = "engine-rendered ChatML" if model.startswith("qwen") else "built-in template"
        print(f"| {model} | {path} | {row[0]:.2f} | {row[1]:.2f} |")
        results[model] = {"reuse_ratio": row[0], "naive_ratio": row[1]}
    cache = tmp / "pcache"
    env_first = restart(lib, tmp, cache, "first question")
    env_second = restart(lib, tmp, cache, "another question")
    system_tokens = env_first["prefilled"] - env_second["prefilled"]
    saved = 1 - env_second["prefilled"] / env_first["prefilled"]
    print(
        f"\nsystem prompt of ~{env_first['input']} tokens: first process prefilled {env_first['prefilled']}, "
        f"a second process {env_second['prefilled']} ({saved:.0%} saved; {system_tokens} tokens from the cache)"
    )
    results["prompt_cache"] = {
        "first_prefilled": env_first["prefilled"],
        "second_prefilled": env_second["prefilled"],
        "saved": saved,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
