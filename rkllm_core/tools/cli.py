"""The ``rkllm`` command line.

Subcommands:

* ``rkllm models [--json] [--model-dir DIR ...]``: the models found, with
  their friendly names, kinds and the facts read from their file names.
* ``rkllm ps [--url URL] [--json]``: the models a running ``rkllm serve`` has loaded.
* ``rkllm info [--json]``: runtime library (path, ABI and why), versions,
  board, RAM, kernel, CPU/NPU/DDR clocks and governors, model directories.
* ``rkllm chat MODEL``: interactive streaming chat (multi-turn through the
  KV cache); Ctrl-C stops the current answer, not the program
  (:mod:`rkllm_core.tools.repl`).
* ``rkllm bench [MODEL ...]`` and ``rkllm bench compare A.json B.json``.
* ``rkllm doctor [MODEL ...]``: a pass/fail board validation to paste into an issue.
* ``rkllm serve [--host H] [--port P] ...``: the OpenAI- and Ollama-compatible server (:mod:`rkllm_core.serve`).
* ``rkllm --version``.

Every failure is one ``rkllm: error: ...`` line on stderr and a non-zero exit
status (2 for a bad model, file or library; 130 after Ctrl-C); a closed
standard output (``rkllm info | head -1``) ends the command quietly (141).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from ..errors import RKLLMError
from ..hub.manifest import source_of
from ..models.registry import ModelInfo, ModelRegistry
from .repl import cmd_chat
from .table import table as _table

JSON_KEYS = (
    "name",
    "kind",
    "filename",
    "path",
    "context_size",
    "dtype",
    "platform",
    "size_mb",
    "source",
    "encoder",
)


def _model_row(info: ModelInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "kind": info.kind,
        "filename": info.filename,
        "path": str(info.path),
        "context_size": info.context_size,
        "dtype": info.dtype,
        "platform": info.platform,
        "size_mb": round(info.size_mb, 1),
        "source": source_of(info.path),  # where rkllm pull took it from, if it did
        "encoder": str(info.encoder) if info.encoder is not None else None,  # the paired image encoder
    }


def cmd_models(args: argparse.Namespace) -> int:
    """List the registered models (what a running server has loaded: ``rkllm ps``)."""
    registry = ModelRegistry(args.model_dir or None)
    rows = [_model_row(m) for m in registry.models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        dirs = ", ".join(str(d) for d in registry.model_dirs)
        print(
            f"rkllm: error: no .rkllm models found; searched: {dirs}. Put model files there or set RKLLM_MODEL_DIR.",
            file=sys.stderr,
        )
        return 1
    columns = [
        ("name", "NAME"),
        ("kind", "KIND"),
        ("filename", "FILE"),
        ("context_size", "CONTEXT"),
        ("dtype", "DTYPE"),
        ("platform", "PLATFORM"),
        ("size_mb", "SIZE_MB"),
    ]
    if any(row["source"] for row in rows):
        columns.append(("source", "SOURCE"))
    if any(row["encoder"] for row in rows):
        columns.append(("encoder", "ENCODER"))
        rows = [{**row, "encoder": os.path.basename(str(row["encoder"] or ""))} for row in rows]
    print(_table(rows, columns))  # problems in registry files were logged when they were read
    return 0


def _library_info(path: str | None) -> dict[str, object]:
    from ..errors import LibraryNotFoundError
    from ..native.library import load_library

    try:
        lib = load_library(path)
    except LibraryNotFoundError as exc:
        return {"found": False, "error": str(exc), "tried": list(exc.tried)}
    except RKLLMError as exc:
        return {"found": True, "error": str(exc)}
    return {
        "found": True,
        "path": str(lib.path),
        "abi": lib.abi,
        "abi_reason": lib.abi_reason,
        "version": lib.version,
        "simulator": lib.is_simulator,
    }


def gather_info(lib_path: str | None, model_dirs: Sequence[str] | None) -> dict[str, object]:
    """Everything ``rkllm info`` reports, as a JSON-serialisable dict."""
    from ..board import read_system_state
    from ..errors import NoModelsFoundError

    registry = ModelRegistry(list(model_dirs) if model_dirs else None)
    try:
        models = [m.name for m in registry.models()]
    except NoModelsFoundError:
        models = []
    return {
        "library": _library_info(lib_path),
        "system": read_system_state().as_dict(),
        "model_dirs": [{"path": str(d), "exists": d.is_dir()} for d in registry.model_dirs],
        "models": models,
    }


def cmd_info(args: argparse.Namespace) -> int:
    """Print the library, system and model facts a bug report needs."""
    info = gather_info(args.lib, args.model_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lib = info["library"]
    assert isinstance(lib, dict)
    print("runtime library")
    if lib.get("path"):
        kind = " (SIMULATOR)" if lib.get("simulator") else ""
        print(f"  path:     {lib['path']}{kind}")
        print(f"  ABI:      {lib['abi']} ({lib['abi_reason']})")
        print(f"  version:  {lib.get('version') or 'unknown (printed by the runtime when a model loads)'}")
    else:
        print(f"  not usable: {lib.get('error')}")
    system = info["system"]
    assert isinstance(system, dict)
    print("system")
    for key in ("board", "soc", "ram_mb", "kernel", "machine", "python", "npu_driver"):
        print(f"  {key + ':':<11} {system.get(key) if system.get(key) is not None else 'unknown'}")
    governors = sorted(set(system["cpu_governors"].values()))
    freqs = system["cpu_freqs_mhz"].values()
    if governors:
        print(f"  cpu:        governors {', '.join(governors)}; {min(freqs)}-{max(freqs)} MHz now")
    for name, dev in system["devfreq"].items():
        if dev.get("kind") in ("npu", "dmc"):
            print(
                f"  {dev['kind']}:        {name}: governor {dev.get('governor')}, {dev.get('cur_freq')} MHz now "
                f"(max {dev.get('max_freq')})"
            )
    for what, why in system["unreadable"].items():
        print(f"  unreadable {what}: {why}")
    print("models")
    for d in info["model_dirs"]:  # type: ignore[attr-defined]
        print(f"  dir {d['path']}{'' if d['exists'] else ' (missing)'}")
    models = info["models"]
    assert isinstance(models, list)
    print(f"  {len(models)} found" + (f": {', '.join(models)}" if models else ""))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark models, or compare two reports (``rkllm bench compare A.json B.json``)."""
    from pathlib import Path

    from ..models.manager import ModelManager
    from .bench import BenchConfig, run_bench, to_markdown, write_outputs

    if args.models[:1] == ["compare"]:
        return _bench_compare(args.models[1:])
    if args.concurrency is not None or args.n_batch is not None:
        return _bench_concurrency(args)
    if any(n < 1 for n in args.prompt_tokens) or args.new_tokens < 1 or args.repeat < 1 or args.warmup < 0:
        print("rkllm: error: token counts and --repeat must be positive", file=sys.stderr)
        return 2
    config = BenchConfig(tuple(args.prompt_tokens), args.new_tokens, args.repeat, args.warmup)
    registry = ModelRegistry(args.model_dir or None)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, md_path = out_dir / f"rkllm-bench-{stamp}.json", out_dir / f"rkllm-bench-{stamp}.md"
    with ModelManager(registry, library=args.lib) as manager:
        report = run_bench(
            manager,
            args.models,
            config,
            progress=sys.stderr,
            on_result=lambda r: write_outputs(r, json_path, md_path),  # keep partial results on disk
        )
    write_outputs(report, json_path, md_path)
    print(to_markdown(report), end="")
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return 130 if report["partial"] else 0


def _bench_concurrency(args: argparse.Namespace) -> int:
    """``rkllm bench MODEL --concurrency C [--n-batch N]``: C streaming clients, unbatched and batched."""
    from .bench_concurrency import run_concurrency, to_table

    clients = args.concurrency if args.concurrency is not None else 8
    n_batch = args.n_batch if args.n_batch is not None else 4
    if len(args.models) != 1 or clients < 1 or not 1 <= n_batch <= 100 or args.new_tokens < 1:
        print("usage: rkllm bench MODEL --concurrency C [--n-batch N] (C >= 1, 1 <= N <= 100)", file=sys.stderr)
        return 2
    registry = ModelRegistry(args.model_dir or None)
    points = run_concurrency(registry, args.lib, args.models[0], [n_batch], clients, args.new_tokens)
    print(to_table(points), end="")
    return 0


def _bench_compare(paths: Sequence[str]) -> int:
    """``rkllm bench compare A.json B.json``."""
    from .bench import compare, load_report

    if len(paths) != 2:
        print("usage: rkllm bench compare A.json B.json", file=sys.stderr)
        return 2
    try:
        a, b = load_report(paths[0]), load_report(paths[1])
    except OSError as exc:
        print(f"rkllm: error: cannot read {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"rkllm: error: {exc}", file=sys.stderr)
        return 2
    print(compare(a, b), end="")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Validate the runtime, a model and the binding; print a report to paste into an issue.

    On the simulator, with no model, no ``--model-dir`` and no ``RKLLM_MODEL_DIR``, two
    simulated models are made in a temporary directory, removed afterwards.
    """
    import tempfile

    from ..board import read_system_state
    from ..models.registry import ENV_MODEL_DIR
    from ..native.library import load_library
    from .doctor import default_manager_for, format_report, run_doctor

    lib_line, simulator = "", False
    try:
        lib = load_library(args.lib)
        lib_line = f"{lib.path} (ABI {lib.abi}, version {lib.version or 'unknown'})"
        simulator = lib.is_simulator
    except RKLLMError:
        pass  # the library step reports it
    s = read_system_state()
    header = (
        f"rkllm doctor — {s.board or s.soc or s.machine}, {s.kernel}, NPU driver {s.npu_driver or 'unknown'}, "
        f"runtime {lib_line or 'not found'}"
    )
    demo = simulator and not args.models and not args.model_dir and not os.environ.get(ENV_MODEL_DIR, "").strip()
    with tempfile.TemporaryDirectory(prefix="rkllm-doctor-") as work:
        model_dirs = args.model_dir
        if demo:
            from ..sim import make_model

            make_model(work, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
            make_model(work, "gemma-3-1b-it_w8a8.rkllm")
            model_dirs = [work]
        with default_manager_for(model_dirs, args.lib) as manager:
            results = run_doctor(manager, args.models, work_dir=work, batch=args.batch)
    print(format_report(results, header))
    return 1 if any(r.status == "FAIL" for r in results) else 0


def _add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``rkllm bench``: its arguments."""
    p = sub.add_parser(
        "bench",
        help="benchmark models (TTFT, prefill/decode tok/s, memory) or compare two reports",
        description="rkllm bench [MODEL ...] | rkllm bench compare A.json B.json",
    )
    p.add_argument("models", nargs="*", help="friendly names (default: every model found), or 'compare A B'")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 1024], help="prompt lengths (128 1024)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (64)")
    p.add_argument("--repeat", type=int, default=3, help="measured runs per point (3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per point (1)")
    p.add_argument(
        "--concurrency",
        type=int,
        metavar="C",
        help="C concurrent streaming clients through the chat engine, unbatched and with --n-batch (one MODEL)",
    )
    p.add_argument("--n-batch", type=int, metavar="N", help="slots of the batched configuration (4; experimental)")
    p.add_argument("--out", default=".", help="directory for the JSON and markdown reports")
    p.add_argument("--lib", help="runtime library path")
    p.add_argument("--model-dir", action="append", help="a model directory (repeatable)")
    p.set_defaults(func=cmd_bench)


def _add_doctor_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``rkllm doctor``: its arguments."""
    p = sub.add_parser("doctor", help="validate runtime, ABI, init, stream, abort, swap and prompt cache")
    p.add_argument("models", nargs="*", help="one or two models to use (default: the first two found)")
    p.add_argument("--lib", help="runtime library path")
    p.add_argument("--model-dir", action="append", help="a model directory (repeatable)")
    p.add_argument(
        "--batch",
        action="store_true",
        help="also check batched decoding (n_batch, experimental): short prompts in one run against single runs",
    )
    p.set_defaults(func=cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``rkllm`` command."""
    parser = argparse.ArgumentParser(prog="rkllm", description="LLMs on the Rockchip NPU (RKLLM runtime).")
    parser.add_argument("--version", action="version", version=f"rkllm {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the models found in the model directories")
    p.add_argument("--json", action="store_true", help="print a JSON list (keys: " + ", ".join(JSON_KEYS) + ")")
    p.add_argument("--model-dir", action="append", help="a model directory (repeatable; default RKLLM_MODEL_DIR)")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("info", help="library, ABI, board, clocks and models: paste this into bug reports")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--lib", help="runtime library path (default: RKLLM_LIB_PATH, then the usual places)")
    p.add_argument("--model-dir", action="append", help="a model directory (repeatable)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("chat", help="interactive streaming chat with a model")
    p.add_argument("model", help="friendly name, file name or path")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--think", action="store_true", help="start with thinking on")
    p.add_argument("--no-color", action="store_true", help="do not dim the reasoning")
    p.add_argument("--lib", help="runtime library path")
    p.add_argument("--model-dir", help="model directory")
    p.set_defaults(func=cmd_chat)
    _add_bench_parser(sub)
    p = sub.add_parser("serve", help="an OpenAI- and Ollama-compatible HTTP server (needs the server extra)")
    from ..serve.run import add_arguments, serve

    add_arguments(p)
    p.set_defaults(func=serve)
    _add_doctor_parser(sub)
    from . import demo, ps, pull

    ps.add_parser(sub)
    pull.add_parsers(sub)
    demo.add_parsers(sub)
    return parser


def version() -> str:
    """The installed ``boardllm`` version (``rkllm_core.__version__`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("boardllm")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rkllm`` console script.

    Returns:
        The exit status: 0, 1 (a check or every answer failed, no server), 2 (an error,
        one ``rkllm: error: ...`` line), 130 (Ctrl-C) or 141 (standard output closed).
    """
    _log_to_stderr()
    try:
        args = build_parser().parse_args(argv)
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except RKLLMError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except OSError as exc:  # a file or directory the user named: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")


def _fail(message: str, status: int = 2) -> int:
    try:
        print(f"rkllm: error: {message}", file=sys.stderr)
    except OSError:
        pass
    return status


def _stdout_closed() -> int:
    """Standard output was closed (``rkllm info | head -1``): end quietly, as after SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
    return 141


def _log_to_stderr() -> None:
    """Show the library's warnings (a bad value in a registry file, ...) as ``rkllm: warning: ...`` lines."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_CliFormatter())
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)


class _CliFormatter(logging.Formatter):
    """A logged problem is one the library went on from (``rkllm: error:`` is kept for the command's end)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"rkllm: warning: {record.getMessage()}"


if __name__ == "__main__":
    raise SystemExit(main())
