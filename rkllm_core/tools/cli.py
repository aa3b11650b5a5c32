"""The ``rkllm`` command line.

Subcommands:

* ``rkllm models [--json] [--model-dir DIR ...]``: the models found, with
  their friendly names, kinds and the facts read from their file names.
* ``rkllm info [--json]``: runtime library (path, ABI and why), versions,
  board, RAM, kernel, CPU/NPU/DDR clocks and governors, model directories.
* ``rkllm chat MODEL``: interactive streaming chat (multi-turn through the
  KV cache); Ctrl-C stops the current answer, not the program.
* ``rkllm bench [MODEL ...]`` and ``rkllm bench compare A.json B.json``.
* ``rkllm doctor [MODEL ...]``: a pass/fail board validation to paste into an issue.
* ``rkllm serve [--host H] [--port P] ...``: the OpenAI- and Ollama-compatible server (:mod:`rkllm_core.serve`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..errors import RKLLMError
from ..models.registry import ModelInfo, ModelRegistry

if TYPE_CHECKING:
    from ..chat.engine import ChatEngine, ChatEvent
    from ..chat.messages import ChatMessage

JSON_KEYS = ("name", "kind", "filename", "path", "context_size", "dtype", "platform", "size_mb", "loaded")


def _model_row(info: ModelInfo, loaded: bool) -> dict[str, object]:
    return {
        "name": info.name,
        "kind": info.kind,
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
    from ..models.manager import _default  # only an already-created default manager can have models loaded

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
        ("kind", "KIND"),
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


DIM, RESET = "\x1b[2m", "\x1b[0m"


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive streaming chat; Ctrl-C stops the current answer, Ctrl-D or /exit quits."""
    from ..chat.engine import ChatEngine
    from ..models.manager import manager_for

    engine = ChatEngine(manager_for(args.model_dir, args.lib))
    info = engine.manager.resolve(args.model)  # unknown names fail here, before anything loads
    chat = _Chat(engine, info.name, args.system, bool(args.think), sys.stdout.isatty() and not args.no_color)
    print(f"chatting with {info.name} ({info.filename}); /reset, /system TEXT, /think on|off, /exit")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text and not chat.command(text):
            chat.answer(text)


class _Chat:
    """The conversation of ``rkllm chat``: its commands, and each answer streamed to the terminal."""

    def __init__(self, engine: ChatEngine, model: str, system: str | None, thinking: bool, color: bool) -> None:
        self.engine = engine
        self.model = model
        self.system = system
        self.thinking = thinking
        self.history: list[ChatMessage] = []
        self.dim, self.reset = (DIM, RESET) if color else ("", "")

    def command(self, text: str) -> bool:
        """Carry out ``/reset``, ``/system TEXT`` or ``/think on|off``; False when ``text`` is none of them."""
        if text == "/reset":
            self.history = []
            print("(conversation cleared)")
        elif text.startswith("/system"):
            self.system = text[len("/system") :].strip() or None
            self.history = []
            print(f"(system prompt {'set' if self.system else 'cleared'}; conversation cleared)")
        elif text.startswith("/think"):
            self.thinking = text.endswith("on")
            print(f"(thinking {'on' if self.thinking else 'off'})")
        else:
            return False
        return True

    def answer(self, text: str) -> None:
        """Stream the answer to ``text``; Ctrl-C stops it (and aborts the run), an error is reported."""
        from ..chat.messages import ChatMessage
        from ..chat.options import ChatOptions

        self.history.append(ChatMessage("user", text))
        messages = ([ChatMessage("system", self.system)] if self.system else []) + self.history
        stream = self.engine.stream(self.model, messages, ChatOptions(enable_thinking=self.thinking))
        try:
            self._show(stream)
        except KeyboardInterrupt:
            stream.close()  # aborts the generation on the NPU; the program goes on
            self.history.pop()
            print(f"{self.reset}\n(stopped)")
        except RKLLMError as exc:
            self.history.pop()
            print(f"{self.reset}\nerror: {exc}", file=sys.stderr)

    def _show(self, events: Iterable[ChatEvent]) -> None:
        """Print the events of one answer: reasoning dimmed, tool calls in brackets, usage at the end."""
        from ..chat.engine import ChatDone, ReasoningDelta, TextDelta, ToolCall

        dim, reset = self.dim, self.reset
        in_reasoning = False
        for event in events:
            if isinstance(event, ReasoningDelta):
                if not in_reasoning:
                    print(dim, end="")
                    in_reasoning = True
                print(event.text, end="", flush=True)
                continue
            if in_reasoning:
                print(reset + "\n", end="")
                in_reasoning = False
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, ToolCall):
                print(f"[tool call {event.name}({json.dumps(event.arguments)})]", end="", flush=True)
            elif isinstance(event, ChatDone):
                self.history.append(event.message)
                u = event.usage
                rate = event.stats.decode_tokens_per_s if event.stats else 0.0
                print(
                    f"\n{dim}[{u.output_tokens} tokens at {rate:.1f} tok/s; prefilled {u.prefilled_tokens} "
                    f"of {u.input_tokens} context tokens; {event.finish_reason}]{reset}"
                )


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark models, or compare two reports (``rkllm bench compare A.json B.json``)."""
    from pathlib import Path

    from ..models.manager import ModelManager
    from .bench import BenchConfig, compare, load_report, run_bench, to_markdown, write_outputs

    if args.models[:1] == ["compare"]:
        if len(args.models) != 3:
            print("usage: rkllm bench compare A.json B.json", file=sys.stderr)
            return 2
        try:
            a, b = load_report(args.models[1]), load_report(args.models[2])
        except (OSError, ValueError) as exc:
            print(f"rkllm: error: {exc}", file=sys.stderr)
            return 2
        print(compare(a, b), end="")
        return 0
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


def cmd_doctor(args: argparse.Namespace) -> int:
    """Validate the runtime, a model and the binding; print a report to paste into an issue."""
    import tempfile

    from ..board import read_system_state
    from ..native.library import load_library
    from .doctor import default_manager_for, format_report, run_doctor

    model_dirs = args.model_dir
    lib_line = ""
    try:
        lib = load_library(args.lib)
        lib_line = f"{lib.path} (ABI {lib.abi}, version {lib.version or 'unknown'})"
        if lib.is_simulator and not args.models and not model_dirs:
            from ..sim import make_model

            demo = tempfile.mkdtemp(prefix="rkllm-doctor-")
            make_model(demo, "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm")
            make_model(demo, "gemma-3-1b-it_w8a8.rkllm")
            model_dirs = [demo]
    except RKLLMError:
        pass  # the library step reports it
    s = read_system_state()
    header = (
        f"rkllm doctor — {s.board or s.soc or s.machine}, {s.kernel}, NPU driver {s.npu_driver or 'unknown'}, "
        f"runtime {lib_line or 'not found'}"
    )
    with default_manager_for(model_dirs, args.lib) as manager:
        results = run_doctor(manager, args.models)
    print(format_report(results, header))
    return 1 if any(r.status == "FAIL" for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``rkllm`` command."""
    parser = argparse.ArgumentParser(prog="rkllm", description="LLMs on the Rockchip NPU (RKLLM runtime).")
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
    p.add_argument("--out", default=".", help="directory for the JSON and markdown reports")
    p.add_argument("--lib", help="runtime library path")
    p.add_argument("--model-dir", action="append", help="a model directory (repeatable)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("serve", help="an OpenAI- and Ollama-compatible HTTP server (needs the server extra)")
    from ..serve.run import add_arguments, serve

    add_arguments(p)
    p.set_defaults(func=serve)
    p = sub.add_parser("doctor", help="validate runtime, ABI, init, stream, abort, swap and prompt cache")
    p.add_argument("models", nargs="*", help="one or two models to use (default: the first two found)")
    p.add_argument("--lib", help="runtime library path")
    p.add_argument("--model-dir", action="append", help="a model directory (repeatable)")
    p.set_defaults(func=cmd_doctor)
    from . import demo, pull

    pull.add_parsers(sub)
    demo.add_parsers(sub)
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
