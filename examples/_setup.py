"""Shared set-up for the examples: the runtime (NPU or simulator) and the model to use.

On a board the examples use ``librkllmrt.so`` and your ``.rkllm`` models (see the README).
Without the runtime they say loudly that they run on the **simulator** (the banner of
``examples/quickstart.py``), build it, and create a demo model file, so they run on any laptop.
Simulated answers are deterministic functions of the prompt (``Echo: <prompt> — ok.``, tool
calls when a prompt names a tool, JSON for a schema), not real answers.

Environment:
    RKLLM_LIB_PATH     the runtime library (default: the usual locations, else the simulator)
    RKLLM_MODEL_DIR    where ``.rkllm`` files are (default: ./models, ~/.local/share/rkllm/models)
    RKLLM_MODEL        which model to use (default: a Qwen model if there is one, else the first found)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rkllm_core.errors import LibraryNotFoundError, NoModelsFoundError  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import load_library  # noqa: E402
from rkllm_core.sim import build_simulator, default_cache_dir, make_model  # noqa: E402

DEMO_MODEL = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm"
SECOND_DEMO_MODEL = "google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm"
BANNER = "=" * 78


@dataclass(frozen=True)
class Setup:
    """What the examples run on."""

    model: str
    """Friendly name of the model to use."""
    simulated: bool
    """True when the runtime is the bundled simulator."""
    library_path: str
    """The runtime library in use."""


def _banner(*lines: str) -> None:
    print(BANNER, file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    print(BANNER, file=sys.stderr)


def pick_runtime() -> tuple[str, bool]:
    """Return the runtime library path and whether it is the simulator, saying so loudly if it is."""
    try:
        lib = load_library()
    except LibraryNotFoundError as exc:
        _banner(
            "NO NPU RUNTIME (librkllmrt.so) FOUND -- RUNNING ON THE SIMULATOR.",
            "Answers are simulated; nothing runs on an NPU.",
            f"({exc.__class__.__name__}: tried {len(exc.tried)} locations; set RKLLM_LIB_PATH on a board)",
        )
        # Pace the simulator like a small model on an RK3588 (~30 tok/s decode, ~1 ms/token prefill).
        os.environ.setdefault("RKLLM_SIM_TOKEN_DELAY_MS", "30")
        os.environ.setdefault("RKLLM_SIM_PREFILL_MS_PER_TOKEN", "1")
        return str(build_simulator("1.3")), True
    if lib.is_simulator:
        _banner(f"RUNNING ON THE SIMULATOR ({lib.path}).", "Answers are simulated; nothing runs on an NPU.")
    return str(lib.path), lib.is_simulator


def setup() -> Setup:
    """Pick the runtime (saying so when it is the simulator) and a model; create a demo model if needed."""
    lib_path, simulated = pick_runtime()
    os.environ["RKLLM_LIB_PATH"] = lib_path  # the process-wide model manager loads this library
    try:
        models = ModelRegistry().models()
    except NoModelsFoundError:
        models = []
    if not models and simulated:
        demo_dir = default_cache_dir().parent / "demo-models"
        make_model(demo_dir, DEMO_MODEL, size_mb=890)  # sparse: costs no disk
        os.environ["RKLLM_MODEL_DIR"] = str(demo_dir)
        models = ModelRegistry().models()
    if not models:
        raise SystemExit(
            "no .rkllm models found: put some in ~/.local/share/rkllm/models or ./models, or set RKLLM_MODEL_DIR"
        )
    wanted = os.environ.get("RKLLM_MODEL")
    name = wanted or next((m.name for m in models if m.name.startswith("qwen")), models[0].name)
    print(f"model: {name}{' (simulated)' if simulated else ''}")
    return Setup(name, simulated, lib_path)


def another_model(env: Setup) -> str:
    """A second model for the examples that use two (on the simulator a demo one is created if needed)."""
    names = [m.name for m in ModelRegistry().models() if m.name != env.model]
    if not names and env.simulated:
        demo_dir = default_cache_dir().parent / "demo-models-second"  # apart: the first may be found twice
        make_model(demo_dir, SECOND_DEMO_MODEL, size_mb=600, think=False)
        dirs = [d for d in os.environ.get("RKLLM_MODEL_DIR", "").split(os.pathsep) if d]
        if str(demo_dir) not in dirs:
            os.environ["RKLLM_MODEL_DIR"] = os.pathsep.join([*dirs, str(demo_dir)])
        names = [m.name for m in ModelRegistry().models() if m.name != env.model]
    if not names:
        raise SystemExit("this example needs two .rkllm models; only one was found")
    return names[0]
