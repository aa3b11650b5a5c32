"""Time to first token of a follow-up turn with an image in the history, against a text-only turn 2.

Both simulators are paced like a board (RK3588 figures, roughly): the RKLLM simulator prefills at
``--prefill-ms`` per token and decodes at ``--token-ms`` per token, the RKNN simulator's encoder takes
``--encoder-ms`` per image. A conversation opens with an image (196 image tokens, as Qwen2.5-VL's
encoder gives) or with the same question without it, then asks a text follow-up; turn 2's TTFT is the
median over ``--repeats`` conversations. With KV reuse the image is neither encoded nor prefilled
again, so the two turn-2 figures should be within 10 %; the rebuilt figure (``reuse_kv=False``: the
whole history prefilled again, the embedding from the process-wide cache) shows what reuse saves.

Usage: python benchmarks/bench_vision.py [--abi 1.3] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from rkllm_core.chat.engine import ChatEngine, ChatEvent, TextDelta
from rkllm_core.chat.messages import ChatMessage, ImagePart
from rkllm_core.chat.options import ChatOptions
from rkllm_core.chat.vision import image_cache
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.sim import (
    RKNNSimulatorControl,
    SimulatorControl,
    build_rknn_simulator,
    build_simulator,
    make_encoder,
    make_model,
)

MODEL = "qwen2.5-vl-3b"
TOKENS, EMBED = 196, 64
OPTIONS = ChatOptions(max_new_tokens=64)  # no reply is cut: on 1.2 a cut reply leaves the KV cache unreusable


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (200 - seed % 150, 40 + seed % 100, 60)).save(out, "PNG")
    return out.getvalue()


def ttft(events: Iterable[ChatEvent]) -> tuple[float, ChatMessage]:
    """Seconds to the first text, and the assistant message."""
    start, first = time.perf_counter(), None
    for event in events:
        if first is None and isinstance(event, TextDelta):
            first = time.perf_counter() - start
        if hasattr(event, "message"):
            message = event.message
    assert first is not None
    return first, message


def conversation(engine: ChatEngine, image: bytes | None, rebuild: ChatEngine | None = None) -> tuple[float, float]:
    """(turn-1 TTFT, turn-2 TTFT) of one conversation opened with ``image`` (or without one)."""
    images = (ImagePart(data=image),) if image is not None else ()
    turn1 = [ChatMessage("user", "What is in this picture? Describe the scene in a few words.", images=images)]
    t1, reply = ttft(engine.stream(MODEL, turn1, OPTIONS))
    turn2 = [*turn1, reply, ChatMessage("user", "And what colour dominates it? Answer in one word.")]
    t2, _ = ttft((rebuild or engine).stream(MODEL, turn2, OPTIONS))
    return t1, t2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--abi", default="1.3", choices=["1.2", "1.3"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-ms", type=float, default=2.0, help="prefill ms per token")
    ap.add_argument("--token-ms", type=float, default=40.0, help="decode ms per token")
    ap.add_argument("--encoder-ms", type=float, default=900.0, help="encoder ms per image")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    lib, rknn = build_simulator(args.abi), build_rknn_simulator()
    sim, rknn_sim = SimulatorControl(lib), RKNNSimulatorControl(rknn)
    tmp = Path(tempfile.mkdtemp())
    make_model(tmp, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=EMBED, think=False)
    make_encoder(tmp, "qwen2.5-vl-3b_vision_rk3588.rknn", height=392, width=392, tokens=TOKENS, embed=EMBED)
    rknn_sim.set("run_delay_ms", args.encoder_ms)
    rows: dict[str, list[float]] = {"image_t1": [], "image_t2": [], "text_t1": [], "text_t2": [], "rebuilt_t2": []}
    with ModelManager(ModelRegistry([tmp], platform=None), library=lib, rknn_library=rknn, preflight=False) as m:
        engine = ChatEngine(m, prompt_cache=False)
        rebuild = ChatEngine(m, prompt_cache=False, reuse_kv=False)
        conversation(engine, png(999))  # load the model and its encoder outside the timings
        sim.set("prefill_ms_per_token", args.prefill_ms)
        sim.set("token_delay_ms", args.token_ms)
        for i in range(args.repeats):
            image_cache().clear()
            for key, value in zip(("image_t1", "image_t2"), conversation(engine, png(i)), strict=True):
                rows[key].append(value)
            for key, value in zip(("text_t1", "text_t2"), conversation(engine, None), strict=True):
                rows[key].append(value)
            rows["rebuilt_t2"].append(conversation(engine, png(i), rebuild)[1])
    med = {k: statistics.median(v) * 1000 for k, v in rows.items()}
    ratio = med["image_t2"] / med["text_t2"]
    print(f"machine: {platform.machine()} {platform.processor() or ''} — simulator, ABI {args.abi}, paced: ")
    print(f"  prefill {args.prefill_ms} ms/token, decode {args.token_ms} ms/token, encoder {args.encoder_ms} ms/image")
    print("| median TTFT (ms) | turn 1 | turn 2 |")
    print("|---|---|---|")
    print(f"| image in turn 1 | {med['image_t1']:.0f} | {med['image_t2']:.0f} |")
    print(f"| text only | {med['text_t1']:.0f} | {med['text_t2']:.0f} |")
    print(f"| image, turn 2 rebuilt (no KV reuse) | | {med['rebuilt_t2']:.0f} |")
    print(f"\nturn 2 with an image in the history ÷ text-only turn 2: {ratio:.3f} (target <= 1.10)")
    if args.json:
        args.json.write_text(json.dumps({"abi": args.abi, "median_ms": med, "ratio": ratio}, indent=2))
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
