"""``rkllm doctor``'s vision step on the simulators: the encoder's versions and geometry, an encoded image, a turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from rkllm_core import preflight
from rkllm_core.chat.vision import image_cache
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.rknn import RKNNLibrary
from rkllm_core.sim import RKNNSimulatorControl, SimulatorControl, make_encoder, make_model
from rkllm_core.tools.doctor import format_report, run_doctor
from tests import rknn_fixtures
from tests.test_preflight import make_tree

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim

VL_FILE = "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm"


@pytest.fixture(autouse=True)
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_tree(tmp_path / "board")
    monkeypatch.setattr(preflight, "SYSTEM_ROOT", str(root))
    image_cache().clear()
    return root


def doctor(model_dir: Path, sim_lib: RuntimeLibrary, rknn_lib: RKNNLibrary) -> dict[str, tuple[str, str]]:
    registry = ModelRegistry([model_dir], platform=None)
    with ModelManager(registry, library=sim_lib, rknn_library=rknn_lib, max_loaded=1, preflight=False) as m:
        results = run_doctor(m)
    assert not [r for r in results if r.status == "FAIL"], format_report(results)
    return {r.name: (r.status, r.detail) for r in results}


def test_a_vision_model_with_its_encoder_is_checked_end_to_end(
    model_dir: Path,
    sim_lib: RuntimeLibrary,
    sim: SimulatorControl,
    rknn_lib: RKNNLibrary,
    rknn_sim: RKNNSimulatorControl,
) -> None:
    make_model(model_dir, VL_FILE, hidden_size=6, think=False)
    make_encoder(model_dir, "qwen2.5-vl-3b_vision_rk3588.rknn", height=24, width=40, fmt="nchw", tokens=12, embed=6)
    status, detail = doctor(model_dir, sim_lib, rknn_lib)["vision (qwen2.5-vl-3b)"]
    assert status == "PASS", detail
    assert "RKNN API 2.3.2 (rknn simulator), driver " in detail  # RKNN_QUERY_SDK_VERSION, as the runtime says
    assert "input 24x40 nchw, 12 tokens x 6 x 1 output(s)" in detail  # from the encoder's attributes
    assert "I see a mostly red image." in detail  # the generated picture reached the model through the encoder
    assert rknn_sim.counter("runs") >= 2  # encoded by the step, then for the chat turn
    assert sim.counter("multimodal_violations") == 0


def test_a_vision_model_without_an_encoder_is_skipped_with_the_reason(
    model_dir: Path, sim_lib: RuntimeLibrary, rknn_lib: RKNNLibrary
) -> None:
    make_model(model_dir, VL_FILE, hidden_size=6, think=False)
    status, detail = doctor(model_dir, sim_lib, rknn_lib)["vision (qwen2.5-vl-3b)"]
    assert status == "SKIP"
    assert "no image encoder" in detail and "serves text only" in detail


def test_text_models_get_no_vision_step(model_dir: Path, sim_lib: RuntimeLibrary, rknn_lib: RKNNLibrary) -> None:
    make_model(model_dir)
    assert not [name for name in doctor(model_dir, sim_lib, rknn_lib) if name.startswith("vision")]
