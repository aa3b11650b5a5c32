"""The ``rkllm demo`` subcommand: the simulator runtime and a set of demo models, for trying rkllm without a board.

``rkllm demo [--dir DIR] [--abi 1.2|1.3]`` builds the bundled runtime
simulator (ABI 1.3 unless told otherwise) and writes the demo models
(:data:`rkllm_core.sim.DEMO_MODELS`: chat ``qwen3-0.6b`` and ``qwen3-1.7b``,
embedding ``qwen3-embedding-0.6b``, reranker ``qwen3-reranker-0.6b``; sparse
files, no disk cost) into DIR (default
``${XDG_CACHE_HOME:-~/.cache}/rkllm/demo/models``). Its stdout is exactly
two lines, ``export RKLLM_LIB_PATH=...`` and ``export RKLLM_MODEL_DIR=...``,
so that ``eval "$(rkllm demo)"`` points this shell's ``rkllm`` commands at
them; everything meant for a person goes to stderr. Running it again
rewrites nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

BANNER = "=" * 78
NEXT_STEPS = ("rkllm models", "rkllm chat qwen3-0.6b", "rkllm serve")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands to the ``rkllm`` parser."""
    p = sub.add_parser(
        "demo",
        help='no board? build the runtime simulator and demo models; use as: eval "$(rkllm demo)"',
        description=(
            "Build the runtime SIMULATOR and write demo models (qwen3-0.6b, qwen3-1.7b, qwen3-embedding-0.6b, "
            "qwen3-reranker-0.6b), then print the two export lines that point rkllm at them. "
            'Use as: eval "$(rkllm demo)"'
        ),
    )
    p.add_argument("--dir", help="where to write the demo models (default: ~/.cache/rkllm/demo/models)")
    p.add_argument("--abi", choices=("1.2", "1.3"), default="1.3", help="the runtime ABI to simulate (1.3)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the simulator, write the demo models, print the exports on stdout and the explanation on stderr."""
    from ..sim import build_simulator, default_demo_dir, make_demo_models

    directory = Path(args.dir).expanduser().resolve() if args.dir else default_demo_dir()
    library = build_simulator(args.abi)
    make_demo_models(directory)
    sys.stdout.write(f"export RKLLM_LIB_PATH={shlex.quote(str(library))}\n")
    sys.stdout.write(f"export RKLLM_MODEL_DIR={shlex.quote(str(directory))}\n")
    sys.stdout.flush()
    again = (
        ["rkllm", "demo"]
        + (["--dir", str(directory)] if args.dir else [])
        + (["--abi", "1.2"] if args.abi == "1.2" else [])
    )
    sys.stderr.write(explanation(library, args.abi, directory, " ".join(shlex.quote(a) for a in again)) + "\n")
    return 0


def explanation(library: Path, abi: str, directory: Path, command: str = "rkllm demo") -> str:
    """What ``rkllm demo`` tells a person: that this is the simulator, what it made, and what to run next.

    Args:
        library: the simulator library.
        abi: its ABI.
        directory: the demo model directory.
        command: the ``rkllm demo`` command line that made them, for the ``eval`` hint.
    """
    from ..models.registry import ModelRegistry

    models = ModelRegistry([directory]).models()
    real = _real_runtime()
    width = max(len(m.name) for m in models)
    rows = [f"  {m.name:<{width}}  {m.kind:<9}  {m.filename}" for m in models]
    return "\n".join(
        [
            BANNER,
            "  SIMULATOR -- NOTHING HERE RUNS ON AN NPU.",
            "  Answers are simulated (the prompt echoed back); use this to try rkllm without a board.",
            BANNER,
            f"runtime:  the simulator of librkllmrt.so, ABI {abi}: {library}",
            f"models:   {directory} (sparse files: no disk used)",
            *rows,
            "",
            "Next: apply the two export lines to your shell, then try the commands:",
            f'  eval "$({command})"',
            *(f"  {command}" for command in NEXT_STEPS),
            "On a board: unset RKLLM_LIB_PATH RKLLM_MODEL_DIR to use the NPU and your own models again.",
            *(
                [f"Note: this machine has an NPU runtime ({real}); the exports point rkllm away from it."]
                if real
                else []
            ),
        ]
    )


def _real_runtime() -> Path | None:
    """The runtime library ``rkllm`` would use without the demo's exports, unless it is a simulator."""
    from ..errors import LibraryNotFoundError
    from ..native.library import find_library

    try:
        found = find_library()
    except LibraryNotFoundError:
        return None
    return None if found.name.startswith("librkllmrt-sim") else found
