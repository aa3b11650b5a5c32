"""Shared set-up for the examples: the runtime (NPU or simulator) and the model to use.

On a board the examples use ``librkllmrt.so`` and your ``.rkllm`` models (see docs/board.md).
Without the runtime they say loudly that they run on the **simulator** (the banner of
``examples/quickstart.py``), build it, and write the demo models of ``rkllm demo`` (in the same
place, ``~/.cache/rkllm/demo/models``) when no models are found, so they run on any laptop.
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
from rkllm_core.filenames import parse_model_filename  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import load_library  # noqa: E402
from rkllm_core.sim import (  # noqa: E402
    DEMO_MODELS,
    DemoModel,
    build_simulator,
    default_demo_dir,
    make_demo_models,
)

# A second chat model of another family, for when your own directory holds only one: a demo
# qwen3 model next to your qwen3 model would make their names ambiguous.
SECOND_DEMO_MODEL = DemoModel("google_gemma-3-270m-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", 600, {"think": False})
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
        demo_dir = default_demo_dir()
        make_demo_models(demo_dir)  # the set `rkllm demo` makes, in the same place; sparse: costs no disk
        os.environ["RKLLM_MODEL_DIR"] = str(demo_dir)
        models = ModelRegistry().models()
    if not models:
        raise SystemExit(
            "no .rkllm models found: put some in ~/.local/share/rkllm/models or ./models, or set RKLLM_MODEL_DIR"
        )
    wanted = os.environ.get("RKLLM_MODEL")
    chat = [m for m in models if m.kind in ("chat", "vision")] or models  # not an embedding model
    name = wanted or next((m.name for m in chat if m.name.startswith("qwen")), chat[0].name)
    print(f"model: {name}{' (simulated)' if simulated else ''}")
    return Setup(name, simulated, lib_path)


def _add_demo_models(folder: str, models: tuple[DemoModel, ...]) -> None:
    """Write some demo models into their own folder beside the demo set and add it to the model directories."""
    demo_dir = default_demo_dir().parent / folder  # apart from the set: the user's models may share its names
    make_demo_models(demo_dir, models)
    dirs = [d for d in os.environ.get("RKLLM_MODEL_DIR", "").split(os.pathsep) if d]
    if str(demo_dir) not in dirs:
        os.environ["RKLLM_MODEL_DIR"] = os.pathsep.join([*dirs, str(demo_dir)])


def another_model(env: Setup) -> str:
    """A second model for the examples that use two (on the simulator a demo one is created if needed)."""
    names = [m.name for m in ModelRegistry().models() if m.name != env.model and m.kind in ("chat", "vision")]
    if not names and env.simulated:
        _add_demo_models("second", (SECOND_DEMO_MODEL,))
        names = [m.name for m in ModelRegistry().models() if m.name != env.model and m.kind in ("chat", "vision")]
    if not names:
        raise SystemExit("this example needs two .rkllm models; only one was found")
    return names[0]


def rag_models(env: Setup) -> tuple[str, str]:
    """The embedding and reranker models for the RAG examples (demo ones on the simulator, if needed).

    On a board, put an embedding and a reranker ``.rkllm`` model (e.g. Qwen3-Embedding-0.6B and
    Qwen3-Reranker-0.6B converted for your SoC) in the model directory, or name them with
    ``RKLLM_EMBED_MODEL`` / ``RKLLM_RERANK_MODEL``.
    """

    def find(kind: str) -> str | None:
        wanted = os.environ.get("RKLLM_EMBED_MODEL" if kind == "embedding" else "RKLLM_RERANK_MODEL")
        if wanted:
            return wanted
        return next((m.name for m in ModelRegistry().models() if m.kind == kind), None)

    embed, rerank = find("embedding"), find("reranker")
    if (embed is None or rerank is None) and env.simulated:
        kinds = {k for k, v in (("embedding", embed), ("reranker", rerank)) if v is None}
        _add_demo_models("rag", tuple(m for m in DEMO_MODELS if parse_model_filename(m.filename).kind in kinds))
        embed, rerank = find("embedding"), find("reranker")
    if embed is None or rerank is None:
        missing = " and ".join(k for k, v in (("an embedding", embed), ("a reranker", rerank)) if v is None)
        raise SystemExit(
            f"this example needs {missing} model (.rkllm), e.g. Qwen3-Embedding-0.6B / Qwen3-Reranker-0.6B "
            "converted for your board, in the model directory (or set RKLLM_EMBED_MODEL / RKLLM_RERANK_MODEL)"
        )
    print(f"embeddings: {embed}; reranker: {rerank}{' (simulated)' if env.simulated else ''}")
    return embed, rerank


def vision_model(env: Setup) -> str:
    """A vision-language model with its image encoder (a simulated pair on the simulator, if needed).

    On a board, put a VL ``.rkllm`` and its ``.rknn`` encoder side by side in the model directory
    (e.g. ``qwen2.5-vl-3b-instruct_w8a8_rk3588.rkllm`` and ``qwen2.5-vl-3b_vision_rk3588.rknn``)
    and ``librknnrt.so`` where the RKNN runtime is found (or ``RKNN_LIB_PATH``); name the model with
    ``RKLLM_VISION_MODEL``. Without ``librknnrt.so`` on the simulator, its simulator is built too.
    """
    from rkllm_core.native.rknn import load_rknn_library
    from rkllm_core.sim import build_rknn_simulator, make_encoder, make_model

    def find() -> str | None:
        wanted = os.environ.get("RKLLM_VISION_MODEL")
        return wanted or next((m.name for m in ModelRegistry().models() if m.encoder is not None), None)

    name = find()
    if name is None and env.simulated:
        where = default_demo_dir().parent / "vision"  # apart from the demo set, like the other extra models
        make_model(where, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=64, think=False, size_mb=3800)
        make_encoder(where, "qwen2.5-vl-3b_vision_rk3588.rknn", size_mb=800)
        dirs = [d for d in os.environ.get("RKLLM_MODEL_DIR", "").split(os.pathsep) if d]
        os.environ["RKLLM_MODEL_DIR"] = os.pathsep.join([*[d for d in dirs if d != str(where)], str(where)])
        name = find()
    if name is None:
        raise SystemExit(
            "this example needs a vision-language model (.rkllm) with its image encoder (.rknn) beside it, "
            "e.g. Qwen2.5-VL-3B converted for your board (or set RKLLM_VISION_MODEL)"
        )
    try:
        load_rknn_library()
    except LibraryNotFoundError:
        if not env.simulated:
            raise
        _banner("NO RKNN RUNTIME (librknnrt.so) FOUND -- THE IMAGE ENCODER RUNS ON ITS SIMULATOR.")
        os.environ["RKNN_LIB_PATH"] = str(build_rknn_simulator())
    print(f"vision model: {name}{' (simulated)' if env.simulated else ''}")
    return name
