"""Board tests of images through the chat engine: only with real runtimes and a VL model.

They are skipped (never faked) elsewhere. On a board, with the model's ``.rknn`` encoder beside it:

    RKLLM_LIB_PATH=/usr/lib/librkllmrt.so RKNN_LIB_PATH=/usr/lib/librknnrt.so \
        RKLLM_TEST_VL_MODEL=~/models/qwen2.5-vl-3b/qwen2.5-vl-3b-w8a8_level1_rk3588.rkllm \
        python -m pytest tests/test_engine_vision_board.py -v
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage, ImagePart
from rkllm_core.chat.options import ChatOptions
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import load_library
from rkllm_core.native.rknn import load_rknn_library

LIB = os.environ.get("RKLLM_LIB_PATH")
RKNN_LIB = os.environ.get("RKNN_LIB_PATH")
MODEL = os.environ.get("RKLLM_TEST_VL_MODEL")


def _real_libraries() -> bool:
    if not LIB or not RKNN_LIB or not MODEL:
        return False
    try:
        return not load_library(LIB).is_simulator and not load_rknn_library(RKNN_LIB).is_simulator
    except Exception:
        return False


pytestmark = [
    pytest.mark.board,
    pytest.mark.skipif(
        not _real_libraries(), reason="needs RKLLM_LIB_PATH, RKNN_LIB_PATH (real runtimes) and RKLLM_TEST_VL_MODEL"
    ),
]


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[ChatEngine, str]]:
    assert MODEL is not None and LIB is not None and RKNN_LIB is not None
    path = Path(MODEL).expanduser()
    registry = ModelRegistry([path.parent])
    manager = ModelManager(registry, library=LIB, rknn_library=RKNN_LIB)
    name = next(info.name for info in registry.models() if info.path == path)
    yield ChatEngine(manager, prompt_cache=False), name
    manager.close()


def test_the_model_names_the_colour_and_turn_two_reuses_the_kv_cache(engine: tuple[ChatEngine, str]) -> None:
    chat, name = engine
    out = io.BytesIO()
    Image.new("RGB", (320, 240), (220, 20, 20)).save(out, "PNG")
    question = ChatMessage(
        "user", "What colour is this image? Answer with one word.", images=(ImagePart(data=out.getvalue()),)
    )
    first = chat.chat(name, [question], ChatOptions(max_new_tokens=16))
    assert "red" in first.text.lower()
    second = chat.chat(
        name, [question, first.message, ChatMessage("user", "Say it again.")], ChatOptions(max_new_tokens=16)
    )
    assert second.kv_reused and second.usage.prefilled_tokens < second.usage.input_tokens
