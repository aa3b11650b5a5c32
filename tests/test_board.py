"""Board tests: only with a real runtime (RKLLM_LIB_PATH) and model (RKLLM_TEST_MODEL).

They are skipped (never faked) elsewhere. On a board:

    RKLLM_LIB_PATH=/usr/lib/librkllmrt.so RKLLM_TEST_MODEL=~/models/qwen3-0.6b.rkllm \
        python -m pytest tests/test_board.py -v
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from rkllm_core.native.library import load_library
from rkllm_core.runtime import RKLLMRuntime

LIB = os.environ.get("RKLLM_LIB_PATH")
MODEL = os.environ.get("RKLLM_TEST_MODEL")


def _real_library() -> bool:
    if not LIB or not MODEL:
        return False
    try:
        return not load_library(LIB).is_simulator
    except Exception:
        return False


pytestmark = [
    pytest.mark.board,
    pytest.mark.skipif(not _real_library(), reason="needs RKLLM_LIB_PATH (a real runtime) and RKLLM_TEST_MODEL"),
]


@pytest.fixture(scope="module")
def rt() -> RKLLMRuntime:
    assert MODEL is not None
    runtime = RKLLMRuntime(Path(MODEL).expanduser())
    yield runtime  # type: ignore[misc]
    runtime.close()


def test_stream_produces_text_and_stats(rt: RKLLMRuntime) -> None:
    chunks = list(rt.stream("Say hello in five words."))
    assert "".join(c.text for c in chunks).strip()
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].stats is None or chunks[-1].stats.generate_tokens > 0


def test_abort_mid_stream_and_recover(rt: RKLLMRuntime) -> None:
    stream = rt.stream("Count from one to one thousand, in words.")
    for i, _ in enumerate(stream):
        if i == 5:
            stream.abort()
    assert stream.finish_reason == "abort"
    assert rt.generate("Reply with OK.").text.strip()


def test_concurrent_callers_queue(rt: RKLLMRuntime) -> None:
    out: list[str] = []
    threads = [threading.Thread(target=lambda: out.append(rt.generate("Name a colour.").text)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(out) == 3 and all(o.strip() for o in out)


def test_keep_history_grows_kv_cache(rt: RKLLMRuntime) -> None:
    rt.clear_kv_cache()
    rt.generate("My name is Ada.", keep_history=True)
    size = rt.kv_cache_size()
    assert size > 0
    rt.clear_kv_cache()
    assert rt.kv_cache_size() < size
