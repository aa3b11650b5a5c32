"""The ``rkllm`` console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_core.sim import make_model
from rkllm_core.tools.cli import JSON_KEYS, main


def test_models_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", size_mb=10)
    make_model(tmp_path, "gemma-3-1b-it_w8a8.rkllm")
    assert main(["models", "--json", "--model-dir", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["gemma3-1b", "qwen3-0.6b"]
    for row in rows:
        assert tuple(row) == JSON_KEYS
    qwen = rows[1]
    assert qwen["context_size"] == 16384 and qwen["dtype"] == "w8a8" and qwen["platform"] == "rk3588"
    assert qwen["size_mb"] == 10.0 and qwen["loaded"] is False and qwen["kind"] == "chat"
    assert rows[0]["context_size"] == 4096


def test_models_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm")
    assert main(["models", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "KIND", "FILE", "CONTEXT", "DTYPE", "PLATFORM", "SIZE_MB", "LOADED"]
    assert out[2].split()[:2] == ["qwen3-0.6b", "chat"]


def test_no_models_is_a_clear_message_not_a_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "rkllm_core.tools.cli", "models", "--model-dir", str(empty)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(empty) in proc.stdout + proc.stderr
