"""``rkllm bench`` with a vision model on both simulators: encoder time per image, TTFT with an image, compare."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from rkllm_core.chat.vision import image_cache
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.rknn import RKNNLibrary
from rkllm_core.sim import RKNNSimulatorControl, SimulatorControl, make_encoder, make_model
from rkllm_core.tools.bench import BenchConfig, compare, run_bench, to_markdown
from tests import rknn_fixtures

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim

VL_FILE = "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm"
CONFIG = BenchConfig(prompt_tokens=(64,), new_tokens=8, repeat=2, warmup=1)
RUN_DELAY_MS = 15


@pytest.fixture
def vision_report(
    model_dir: Path,
    sim_lib: RuntimeLibrary,
    sim: SimulatorControl,
    rknn_lib: RKNNLibrary,
    rknn_sim: RKNNSimulatorControl,
) -> dict[str, Any]:
    make_model(model_dir, VL_FILE, hidden_size=6, think=False)
    make_encoder(model_dir, "qwen2.5-vl-3b_vision_rk3588.rknn", height=32, width=32, tokens=16, embed=6)
    rknn_sim.set("run_delay_ms", RUN_DELAY_MS)  # every encoder run takes at least this long
    image_cache().clear()
    registry = ModelRegistry([model_dir], platform=None)
    with ModelManager(registry, library=sim_lib, rknn_library=rknn_lib, preflight=False) as m:
        report = run_bench(m, [], CONFIG)
    # Each run encodes two new images (one alone, one in the chat turn): nothing came from the image cache.
    assert rknn_sim.counter("runs") == 2 * (CONFIG.warmup + CONFIG.repeat)
    assert sim.counter("multimodal_violations") == 0
    image_cache().clear()
    return report


def test_a_vision_model_gets_encoder_time_and_ttft_with_an_image(vision_report: dict[str, Any]) -> None:
    assert [(r["model"], r["prompt_tokens"]) for r in vision_report["results"]] == [("qwen2.5-vl-3b", 64)]
    (row,) = vision_report["vision"]
    assert row["model"] == "qwen2.5-vl-3b" and row["kind"] == "vision"
    assert row["encoder"] == "qwen2.5-vl-3b_vision_rk3588.rknn"
    assert row["input"] == "32x32" and row["image_tokens"] == 16  # the loaded encoder's geometry
    assert len(row["runs"]) == CONFIG.repeat
    for run in row["runs"]:
        assert run["encode_ms"] >= RUN_DELAY_MS  # the encoder run itself was timed
        assert run["image_ttft_ms"] >= RUN_DELAY_MS  # the turn's image was encoded before its first token
        assert run["image_prefill_tokens"] >= 16  # the image tokens were prefilled with the text
        assert run["preprocess_ms"] > 0
    json.dumps(vision_report)
    md = to_markdown(vision_report)
    assert "| Encoder (ms/image) | TTFT with an image (ms) |" in md
    assert "| qwen2.5-vl-3b | qwen2.5-vl-3b_vision_rk3588.rknn | 32x32 | 16 |" in md


def test_compare_and_markdown_accept_reports_without_vision(vision_report: dict[str, Any]) -> None:
    old = copy.deepcopy(vision_report)
    del old["vision"]  # a report written before vision rows existed
    assert "TTFT with an image" not in to_markdown(old)
    assert "| qwen2.5-vl-3b | only in the second report | |" in compare(old, vision_report)
    assert "TTFT with an image" not in compare(vision_report, old)
    both = compare(vision_report, vision_report)
    assert "| qwen2.5-vl-3b | " in both.split("TTFT with an image (ms) |", 1)[1]


def test_a_vision_model_without_an_encoder_gets_no_vision_row(
    model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl
) -> None:
    make_model(model_dir, VL_FILE, hidden_size=6, think=False)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib, preflight=False) as m:
        report = run_bench(m, [], CONFIG)
    assert report["vision"] == [] and len(report["results"]) == 1
