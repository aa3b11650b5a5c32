"""The vision example and notebook run end to end on both simulators (RKLLM and RKNN).

The simulated VL model names the dominant colour of each image it is given, so "red" in the answers
proves the picture drawn by the example went through each framework's image form, the encoder and
the model. The script falls back to the simulators itself (loud banners); the notebook is run with
the simulators named in the environment, on the ``python3`` kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import rknn_fixtures

rknn_sim_path = rknn_fixtures.rknn_sim_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RKLLM_", "RKNN_"))}
    env.update(
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        RKLLM_MODEL_DIR=str(tmp_path / "no-models"),
        RKLLM_SIM_TOKEN_DELAY_MS="0",
        RKLLM_SIM_PREFILL_MS_PER_TOKEN="0",
        RKLLM_PROMPT_CACHE_DIR=str(tmp_path / "pcache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def test_vision_example_falls_back_to_the_simulators_and_sees_the_picture(
    clean_env: dict[str, str], sim_paths: dict[str, Path], rknn_sim_path: Path
) -> None:
    from rkllm_core.errors import LibraryNotFoundError
    from rkllm_core.native.rknn import find_rknn_library

    try:
        find_rknn_library()
    except LibraryNotFoundError:
        pass
    else:
        pytest.skip("an RKNN runtime is installed here; the fallback cannot be exercised")
    clean_env["RKLLM_LIB_PATH"] = str(sim_paths["1.3"])  # built by the fixture; the RKNN one the example builds
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "vision.py")], capture_output=True, text=True, env=clean_env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    assert "RUNNING ON THE SIMULATOR" in proc.stderr
    assert "NO RKNN RUNTIME (librknnrt.so) FOUND -- THE IMAGE ENCODER RUNS ON ITS SIMULATOR." in proc.stderr
    out = proc.stdout
    assert "vision model: qwen2.5-vl-3b (simulated)" in out
    assert "[langchain] I see a mostly red image." in out
    assert "[llamaindex] I see a mostly red image." in out
    assert "KV reused: True" in out  # the follow-up did not prefill the image again


def test_vision_example_reads_an_image_file(
    clean_env: dict[str, str], sim_paths: dict[str, Path], rknn_sim_path: Path, tmp_path: Path
) -> None:
    from PIL import Image

    photo = tmp_path / "blue.jpg"
    Image.new("RGB", (64, 48), (10, 30, 220)).save(photo)
    clean_env.update(RKLLM_LIB_PATH=str(sim_paths["1.3"]), RKNN_LIB_PATH=str(rknn_sim_path))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "vision.py"), str(photo)],
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[langchain] I see a mostly blue image." in proc.stdout


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_vision_notebook_runs(
    clean_env: dict[str, str],
    sim_paths: dict[str, Path],
    rknn_sim_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    examples = tmp_path / "ex"
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    nb = nbformat.read(examples / "vision.ipynb", as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    clean_env.update(RKLLM_LIB_PATH=str(sim_paths["1.3"]), RKNN_LIB_PATH=str(rknn_sim_path))
    for key in [k for k in os.environ if k.startswith(("RKLLM_", "RKNN_"))]:
        monkeypatch.delenv(key)
    for key, value in clean_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(examples)}}
    )
    client.execute()
    text = "".join(str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert text.count("I see a mostly red image.") == 2  # LangChain, then LlamaIndex
