"""The ``rkllm`` command line.

Subcommands:

* ``rkllm models [--json] [--model-dir DIR ...]``: the models found, with
  their friendly names and the facts read from their file names.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import RKLLMError
from .registry import ModelInfo, ModelRegistry

JSON_KEYS = ("name", "filename", "path", "context_size", "dtype", "platform", "size_mb", "loaded")


def _model_row(info: ModelInfo, loaded: bool) -> dict[str, object]:
    return {
        "name": info.name,
        "filename": info.filename,
        "path": str(info.path),
        "context_size": info.context_size,
        "dtype": info.dtype,
        "platform": info.platform,
        "size_mb": round(info.size_mb, 1),
        "loaded": loaded,
    }


def _table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    cells = [[h for _, h in columns]] + [["" if r[k] is None else str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    """List the registered models."""
    registry = ModelRegistry(args.model_dir or None)
    models = registry.models()
    from .manager import _default  # only an already-created default manager can have models loaded

    loaded = {e.info.name for e in _default.loaded()} if _default is not None else set()
    rows = [_model_row(m, m.name in loaded) for m in models]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        dirs = ", ".join(str(d) for d in registry.model_dirs)
        print(f"no .rkllm models found; searched: {dirs}. Put model files there or set RKLLM_MODEL_DIR.")
        return 1
    columns = [
        ("name", "NAME"),
        ("filename", "FILE"),
        ("context_size", "CONTEXT"),
        ("dtype", "DTYPE"),
        ("platform", "PLATFORM"),
        ("size_mb", "SIZE_MB"),
        ("loaded", "LOADED"),
    ]
    print(_table(rows, columns))
    for problem in registry.errors:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``rkllm`` command."""
    parser = argparse.ArgumentParser(prog="rkllm", description="LLMs on the Rockchip NPU (RKLLM runtime).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the models found in the model directories")
    p.add_argument("--json", action="store_true", help="print a JSON list (keys: " + ", ".join(JSON_KEYS) + ")")
    p.add_argument("--model-dir", action="append", help="a model directory (repeatable; default RKLLM_MODEL_DIR)")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rkllm`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RKLLMError as exc:
        print(f"rkllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rkllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
