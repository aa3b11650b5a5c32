"""The ``rkllm pull`` and ``rkllm rm`` subcommands.

* ``rkllm pull REF [--dir DIR] [--revision REV] [--file NAME]``: download a
  model from the Hugging Face Hub into its own folder under the first model
  directory (or ``DIR``), checked against the Hub's sha256 before it becomes
  visible (:mod:`rkllm_core.hub.download`). A progress bar on a terminal, plain
  lines otherwise. Ctrl-C keeps the partial download, hidden, for the next
  pull to resume.
* ``rkllm rm NAME``: delete a pulled model's folder (a model that was not
  pulled is refused, with its path).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from ..hub.download import PullProgress, pull
from ..hub.refs import parse_ref
from ..hub.store import remove_model
from ..models.registry import ModelRegistry, default_model_dirs


def _say(line: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


def _size(count: int) -> str:
    if count >= 2**20:
        return f"{count / 2**20:.1f} MiB"
    return f"{count / 2**10:.1f} KiB" if count >= 2**10 else f"{count} B"


def _plain_reporter() -> Callable[[PullProgress], None]:
    """Print each new step once, as a plain line on stderr (the bar, when shown, tells the bytes)."""
    said: set[tuple[str, str | None]] = set()

    def report(progress: PullProgress) -> None:
        key = (progress.status, progress.file)
        if key in said or progress.status in ("success", "up to date"):
            return
        said.add(key)
        if progress.status.startswith("pulling ") and progress.total is not None:
            line = f"{progress.status} ({_size(progress.total)})"
        else:
            line = f"{progress.status}: {progress.file}" if progress.file else progress.status
        _say(line, sys.stderr)

    return report


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull a model from the Hugging Face Hub."""
    ref = parse_ref(args.ref, filename=args.file, revision=args.revision)
    try:
        result = pull(ref, args.dir, on_progress=_plain_reporter(), progress_bar=True)
    except KeyboardInterrupt:
        _say("rkllm: the partial download is kept (hidden); run the same command to resume", sys.stderr)
        raise
    home = result.model_path.parent.parent
    dirs = default_model_dirs()
    registry = ModelRegistry(dirs if home in dirs else [home])
    name = next((m.name for m in registry.models() if m.path == result.model_path.resolve()), result.model_path.stem)
    if home not in dirs:
        _say(f"note: {home} is not a model directory; use it with RKLLM_MODEL_DIR={home} or --model-dir", sys.stderr)
    if result.offline:
        state = "present (offline mode; not checked against the Hub)"
    else:
        state = "up to date" if result.up_to_date else f"pulled {len(result.downloaded)} file(s)"
    _say(f"{name}: {state}, from {result.source}")
    _say(f"  {result.model_path}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove a pulled model."""
    folder = remove_model(args.name, args.model_dir or None)
    _say(f"removed {folder}")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands to the ``rkllm`` parser."""
    p = sub.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub (checked against its sha256)",
        description="Download a .rkllm model and its companion files (tokenizer, vision encoder, README, "
        "licence) from the Hugging Face Hub into its own folder under the first model directory. "
        "REF: OWNER/REPO/FILE.rkllm, hf.co/OWNER/REPO[/FILE], hf.co/OWNER/REPO:TAG (TAG picks the "
        "file whose name contains it, e.g. w8a8 or rk3576) or OWNER/REPO (the file for this board). "
        "Honours HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE.",
    )
    p.add_argument("ref", metavar="REF", help="what to pull (see above)")
    p.add_argument("--dir", metavar="DIR", help="model directory to pull into (default: the first model directory)")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    p.add_argument("--file", metavar="NAME", help="the .rkllm file to take, as a path inside the repository")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser(
        "rm",
        help="remove a model that rkllm pull brought",
        description="Delete a pulled model's folder: the model, its companion files and its manifest.",
    )
    p.add_argument("name", metavar="NAME", help="the model's name (as rkllm models lists it) or path")
    p.add_argument("--model-dir", action="append", metavar="DIR", help="model directory (repeatable)")
    p.set_defaults(func=cmd_rm)
