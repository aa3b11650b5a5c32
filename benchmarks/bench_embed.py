"""Overhead of embeddings and reranking, measured on the simulator.

Texts per second for one batch of texts through:

* ``raw``: a bare ctypes loop, one ``rkllm_run`` per text in hidden-state mode on one handle with an
  empty chat template, whose callback copies the last row (what the vendor's demo does);
* ``core``: ``EmbeddingEngine.embed`` (lease, session, recipe, copy, pooling, normalisation);
* ``langchain``: ``RKLLMEmbeddings.embed_documents``; ``llamaindex``: ``RKLLMEmbedding.get_text_embedding_batch``;
* ``rerank``: ``EmbeddingEngine.rerank`` pairs/s against the same raw loop in logits mode.

Each is reported as a ratio to the raw rate, measured alternately (raw, then the path) so load drifts
hit both sides, at zero prefill cost (pure overhead) and paced like a board (``--prefill-ms``).

Usage: python benchmarks/bench_embed.py [--abi 1.3] [--texts 200] [--repeat 5] [--prefill-ms 0.5]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_core import machine

from rkllm_core.embed import EmbeddingEngine
from rkllm_core.embed.recipes import QWEN3_RERANKER
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.functions import abi_module
from rkllm_core.native.library import load_library
from rkllm_core.native.structs import LLMHandle, LLMResultCallback, RKLLMInferMode, RKLLMResult, field_offset
from rkllm_core.sim import SimulatorControl, build_simulator, make_model

EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
RERANK = "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm"
WORDS = "board npu model text vector query answer cache token context memory speed".split()


def make_texts(n: int, words: int = 48) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] + str(j % 5) for j in range(words)) for i in range(n)]


class RawLoop:
    """One handle, one bare callback that copies the last row of the tensor: the floor for the binding."""

    def __init__(self, lib_path: Path, model: Path, mode: RKLLMInferMode) -> None:
        lib = load_library(lib_path)
        self.fns, m = lib.functions, abi_module(lib.abi)
        self.m, self.mode, self.rows = m, mode, 0
        offset = field_offset(RKLLMResult, "last_hidden_layer" if mode == 1 else "logits")

        def cb(result: int, userdata: int, state: int) -> int:
            if state == 0 and result:
                head = ctypes.cast(result + offset, ctypes.POINTER(ctypes.c_void_p * 2))[0]
                sizes = ctypes.cast(result + offset + 8, ctypes.POINTER(ctypes.c_int * 2))[0]
                width, rows = sizes[0], sizes[1]
                if head[0] and rows > 0:
                    ctypes.string_at(head[0] + (rows - 1) * width * 4, width * 4)
                    self.rows += 1
            return 0

        self._cb = LLMResultCallback(cb)
        param = self.fns.rkllm_createDefaultParam()
        self._path = os.fsencode(model)
        param.model_path = self._path
        param.max_context_len = 0
        self.handle = LLMHandle()
        if lib.abi == "1.3":
            self._cbs = m.RKLLMCallback()
            self._cbs.result_callback = self._cb
            rc = self.fns.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), ctypes.byref(self._cbs))
        else:
            rc = self.fns.rkllm_init(ctypes.byref(self.handle), ctypes.byref(param), self._cb)
        assert rc == 0
        self.fns.rkllm_set_chat_template(self.handle, b"", b"", b"")

    def run(self, prompts: list[str]) -> float:
        t0 = time.perf_counter()
        for prompt in prompts:
            inp = self.m.RKLLMInput()
            inp.role, inp.input_type, inp.prompt_input = b"user", 0, prompt.encode()
            infer = self.m.RKLLMInferParam()
            infer.mode = int(self.mode)
            infer.keep_history = 0
            self.fns.rkllm_run(self.handle, ctypes.byref(inp), ctypes.byref(infer), None)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.fns.rkllm_destroy(self.handle)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefill-ms", type=float, default=0.5, help="simulated prefill ms per token for the paced run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from langchain_rkllm import RKLLMEmbeddings
    from llamaindex_rkllm import RKLLMEmbedding

    lib_path = build_simulator(args.abi)
    sim = SimulatorControl(lib_path)
    texts = make_texts(args.texts)
    query = "which board answers a query from the cache"
    report: dict[str, object] = {"machine": machine(), "abi": args.abi, "texts": args.texts, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        embed_file = make_model(d, EMBED)
        rerank_file = make_model(d, RERANK, yes_token=QWEN3_RERANKER.yes_id, no_token=QWEN3_RERANKER.no_id)
        manager = ModelManager(ModelRegistry([d], platform=None), library=lib_path, max_loaded=2)
        engine = EmbeddingEngine(manager)
        lc = RKLLMEmbeddings(model="qwen3-embedding-0.6b", manager=manager, batch_size=args.texts)
        li = RKLLMEmbedding("qwen3-embedding-0.6b", manager=manager, embed_batch_size=args.texts)
        raw_embed = RawLoop(lib_path, embed_file, RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER)
        raw_rerank = RawLoop(lib_path, rerank_file, RKLLMInferMode.RKLLM_INFER_GET_LOGITS)
        embed_prompts = [t + "<|endoftext|>" for t in texts]
        rerank_prompts = [
            QWEN3_RERANKER.template.format(instruction=QWEN3_RERANKER.instruction, query=query, document=t)
            for t in texts
        ]
        paths: dict[str, tuple[RawLoop, list[str], Callable[[], object]]] = {
            "core": (raw_embed, embed_prompts, lambda: engine.embed("qwen3-embedding-0.6b", texts)),
            "langchain": (raw_embed, embed_prompts, lambda: lc.embed_documents(texts)),
            "llamaindex": (raw_embed, embed_prompts, lambda: li.get_text_embedding_batch(texts)),
            "rerank": (raw_rerank, rerank_prompts, lambda: engine.rerank("qwen3-reranker-0.6b", query, texts)),
        }
        try:
            for label, prefill in (("overhead", 0.0), ("paced", args.prefill_ms)):
                sim.set("prefill_ms_per_token", prefill)
                for name, (raw, prompts, fn) in paths.items():
                    fn()  # load and warm up
                    ratios, rates = [], []
                    for _ in range(args.repeat):
                        raw_s = raw.run(prompts)
                        path_s = timed(fn)
                        ratios.append(raw_s / path_s)
                        rates.append(args.texts / path_s)
                    key = f"{name}/{label}"
                    report["runs"][key] = {  # type: ignore[index]
                        "ratio_to_raw": statistics.median(ratios),
                        "items_per_s": statistics.median(rates),
                    }
                    print(
                        f"{key:22s} {statistics.median(rates):9.1f} items/s  "
                        f"{statistics.median(ratios):.2f} of the raw rate"
                    )
        finally:
            raw_embed.close()
            raw_rerank.close()
            manager.close()
    print(f"machine: {report['machine']}; ABI {args.abi}; {args.texts} texts of ~48 words")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
