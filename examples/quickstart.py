"""Quickstart: stream a reply from a model on the NPU, or on the simulator when there is no NPU.

Usage:
    python examples/quickstart.py [MODEL] [PROMPT]

MODEL is a friendly name such as ``qwen3-0.6b`` (default: the first model found).
On a board, put ``.rkllm`` files in ``~/.local/share/rkllm/models`` or ``./models``
(or set ``RKLLM_MODEL_DIR``). Without ``librkllmrt.so`` the bundled simulator is
built and used, with a demo model, so the same code runs on any laptop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rkllm_core.errors import LibraryNotFoundError, NoModelsFoundError, RKLLMError
from rkllm_core.library import load_library
from rkllm_core.manager import ModelManager
from rkllm_core.registry import ModelRegistry
from rkllm_core.simulator import build_simulator, default_cache_dir, make_model


def pick_runtime() -> tuple[str, bool]:
    """Return the runtime library path and whether it is the simulator."""
    try:
        return str(load_library().path), False
    except LibraryNotFoundError as exc:
        banner = "=" * 78
        print(banner, file=sys.stderr)
        print("  NO NPU RUNTIME (librkllmrt.so) FOUND -- RUNNING ON THE SIMULATOR.", file=sys.stderr)
        print("  Answers are simulated; nothing runs on an NPU.", file=sys.stderr)
        print(
            f"  ({exc.__class__.__name__}: tried {len(exc.tried)} locations; set RKLLM_LIB_PATH on a board)",
            file=sys.stderr,
        )
        print(banner, file=sys.stderr)
        # Pace the simulator like a small model on an RK3588 (~30 tok/s decode, ~1 ms/token prefill).
        os.environ.setdefault("RKLLM_SIM_TOKEN_DELAY_MS", "30")
        os.environ.setdefault("RKLLM_SIM_PREFILL_MS_PER_TOKEN", "1")
        return str(build_simulator("1.3")), True


def main() -> int:
    lib_path, simulated = pick_runtime()
    os.environ["RKLLM_LIB_PATH"] = lib_path
    registry = ModelRegistry()
    if simulated:
        try:
            registry.models()
            have_models = bool(registry.models())
        except NoModelsFoundError:
            have_models = False
        if not have_models:
            demo_dir = default_cache_dir().parent / "demo-models"
            make_model(demo_dir, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm", size_mb=890)
            registry = ModelRegistry([demo_dir])
    name = sys.argv[1] if len(sys.argv) > 1 else None
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Hello! What can you do on a Rockchip NPU?"
    try:
        models = registry.models()
        if not models:
            raise NoModelsFoundError(
                "no .rkllm models found; searched: " + ", ".join(str(d) for d in registry.model_dirs),
                searched=[str(d) for d in registry.model_dirs],
            )
        name = name or models[0].name
        with ModelManager(registry, library=lib_path) as manager, manager.using(name) as lease:
            info = lease.info
            print(f"model: {info.name} ({info.filename}, context {info.context_size}, ABI {lease.runtime.abi})")
            print(f"> {prompt}")
            stream = lease.runtime.stream(prompt)
            for chunk in stream:
                print(chunk.text, end="", flush=True)
            print()
            stats = stream.stats
            if stats is not None:
                print(
                    f"[{stats.prefill_tokens} prompt tokens in {stats.prefill_time_ms:.0f} ms, "
                    f"{stats.generate_tokens} new tokens at {stats.decode_tokens_per_s:.1f} tok/s, "
                    f"finish: {stream.finish_reason}{', simulated' if simulated else ''}]"
                )
    except RKLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
