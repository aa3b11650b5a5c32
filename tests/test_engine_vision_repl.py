"""``rkllm chat``'s ``/image PATH``: the image goes with the next message; a bad file is a one-line error."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from rkllm_core.sim import make_encoder, make_model
from tests import rknn_fixtures

rknn_sim_path = rknn_fixtures.rknn_sim_path


def test_an_attached_image_reaches_the_model_with_the_next_message(
    sim_paths: dict[str, Path], rknn_sim_path: Path, model_dir: Path, tmp_path: Path
) -> None:
    make_model(model_dir, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=6, think=False)
    make_encoder(model_dir, "qwen2.5-vl-3b_vision_rk3588.rknn", height=32, width=32, tokens=8, embed=6)
    photo = tmp_path / "photo.png"
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (20, 200, 40)).save(buffer, "PNG")
    photo.write_bytes(buffer.getvalue())
    (tmp_path / "notes.png").write_text("not an image")
    env = {**os.environ, "RKNN_LIB_PATH": str(rknn_sim_path), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rkllm_core.tools.cli", "chat", "qwen2.5-vl-3b"]
    cmd += ["--lib", str(sim_paths["1.3"]), "--model-dir", str(model_dir)]
    lines = [f"/image {tmp_path / 'notes.png'}", f"/image {tmp_path / 'missing.png'}", f"/image {photo}"]
    script = "\n".join([*lines, "what is it?", "and now?", ""])
    proc = subprocess.run(cmd, input=script + "/exit\n", capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(image photo.png attached" in proc.stdout
    answers = [line for line in proc.stdout.splitlines() if "Echo:" in line]
    assert answers[0].lstrip("> ").startswith("I see a mostly green image.")
    assert "I see" not in answers[1]  # the image went with one message only
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr  # one line per bad file
