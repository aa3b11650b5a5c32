"""Quickstart: stream a reply from a model on the NPU, or on the simulator when there is no NPU.

Usage:
    python examples/quickstart.py [MODEL] [PROMPT]

MODEL is a friendly name such as ``qwen3-0.6b`` (default: ``RKLLM_MODEL``, else a Qwen model,
else the first model found). On a board, put ``.rkllm`` files in ``~/.local/share/rkllm/models``
or ``./models`` (or set ``RKLLM_MODEL_DIR``). Without ``librkllmrt.so`` the bundled simulator is
built and used, with the demo models of ``rkllm demo`` (in the same place), so the same code runs
on any laptop. It ends by printing what to run next.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _setup import Setup, setup  # noqa: E402  (runtime and model selection shared by the examples)

from rkllm_core.errors import RKLLMError  # noqa: E402
from rkllm_core.models.manager import default_manager  # noqa: E402


def _activate_line() -> str | None:
    """The command that puts this virtualenv's ``rkllm`` on the PATH (None outside a virtualenv)."""
    if sys.prefix == sys.base_prefix:
        return None
    venv = Path(sys.prefix)
    try:
        shown = str(venv.relative_to(Path.cwd()))
    except ValueError:
        shown = str(venv)
    return f"source {shlex.quote(shown + '/bin/activate')}"


def next_steps(env: Setup) -> str:
    """What to run next: the ``rkllm`` command line, on the simulator's demo models or on this board's models."""
    chat = "qwen3-0.6b" if env.simulated else env.model
    steps = [(_activate_line(), "puts the rkllm command on the PATH of this shell")]
    if env.simulated:
        steps.append(('eval "$(rkllm demo)"', "points rkllm at the SIMULATOR and its demo models"))
    steps += [
        ("rkllm models", "lists the models and their kinds"),
        (f"rkllm chat {shlex.quote(chat)}", "chats in the terminal (Ctrl-D quits)"),
        ("rkllm serve", "an OpenAI- and Ollama-compatible server on http://127.0.0.1:8080"),
    ]
    shown = [(command, why) for command, why in steps if command]
    width = max(len(command) for command, _ in shown)
    return "\n".join(["", "Next, try the rkllm command:", *(f"  {c:<{width}}  # {w}" for c, w in shown)])


def main() -> int:
    if len(sys.argv) > 1:
        os.environ["RKLLM_MODEL"] = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Hello! What can you do on a Rockchip NPU?"
    try:
        env = setup()
        with default_manager().lease(env.model) as lease:
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
                    f"finish: {stream.finish_reason}{', simulated' if env.simulated else ''}]"
                )
        print(next_steps(env))
    except RKLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
