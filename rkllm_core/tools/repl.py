"""``rkllm chat``: an interactive streaming chat in the terminal.

Before the prompt opens the model is checked and loaded, so a model the
command can never serve (an embedding or reranker model, a missing,
unreadable or corrupt file, no runtime library) is a one-line error and exit
status 2, not a prompt whose every turn fails. Ctrl-C stops the current
answer, Ctrl-D or ``/exit`` quits; the exit status is 1 when every turn failed.
``/image PATH`` attaches an image (read and decoded at once, so a bad file is a
one-line error) to the next message, for a vision model with an image encoder.
"""

# ruff: noqa: T201 - a command line prints

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelFileError, RKLLMError
from ..models.registry import CHAT_KINDS, ModelInfo, require_kind
from .loading import show_loads

if TYPE_CHECKING:
    from ..chat.engine import ChatEngine, ChatEvent
    from ..chat.messages import ChatMessage, ImagePart
    from ..models.manager import ModelManager

__all__ = ["check_readable", "cmd_chat", "prepare_chat_model"]

DIM, RESET = "\x1b[2m", "\x1b[0m"


def check_readable(path: Path) -> None:
    """Refuse a model file that is gone, unreadable or empty, before the runtime sees it.

    Raises:
        ModelFileError: the file cannot be read, or holds nothing.
    """
    try:
        with path.open("rb") as handle:
            if not handle.read(1):
                raise ModelFileError(f"model file {str(path)!r} is empty")
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {str(path)!r}: {exc.strerror or exc}") from exc


def prepare_chat_model(manager: ModelManager, model: str, command: str = "rkllm chat") -> ModelInfo:
    """Resolve ``model``, check it is a readable chat model, and load it (showing the load on stderr).

    Args:
        manager: the manager that serves the chat.
        model: a name, file name or path.
        command: who asks, for the refusal of a model of another kind.

    Returns:
        The model, loaded and left in the manager.

    Raises:
        RKLLMError: unknown model, wrong kind, unreadable file, no runtime library, or a failed load.
    """
    info = manager.resolve(model)
    require_kind(info, CHAT_KINDS, f"{command} and the chat classes")
    check_readable(info.path)
    manager.library  # noqa: B018 - no runtime library: fail here, before anything else
    with show_loads(manager), manager.lease(info.name):
        pass
    return info


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive streaming chat; Ctrl-C stops the current answer, Ctrl-D or /exit quits."""
    from ..chat.engine import ChatEngine
    from ..models.manager import manager_for

    engine = ChatEngine(manager_for(args.model_dir, args.lib))
    info = prepare_chat_model(engine.manager, args.model)
    chat = _Chat(engine, info.name, args.system, bool(args.think), sys.stdout.isatty() and not args.no_color)
    print(f"chatting with {info.name} ({info.filename}); /reset, /system TEXT, /think on|off, /image PATH, /exit")
    with show_loads(engine.manager):
        chat.loop()
    if chat.failed and not chat.answered:
        print(f"rkllm: error: every answer failed ({chat.failed})", file=sys.stderr)
        return 1
    return 0


class _Chat:
    """The conversation of ``rkllm chat``: its commands, and each answer streamed to the terminal."""

    def __init__(self, engine: ChatEngine, model: str, system: str | None, thinking: bool, color: bool) -> None:
        self.engine = engine
        self.model = model
        self.system = system
        self.thinking = thinking
        self.history: list[ChatMessage] = []
        self.images: list[ImagePart] = []
        self.dim, self.reset = (DIM, RESET) if color else ("", "")
        self.answered = 0
        self.failed = 0

    def loop(self) -> None:
        """Read prompts until end of input or ``/exit``."""
        if hasattr(sys.stdin, "reconfigure"):  # a line that is not text is refused alone, not with the next ones
            sys.stdin.reconfigure(errors="surrogateescape")
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            except UnicodeDecodeError as exc:  # bytes that are not text in the terminal's encoding
                print(f"error: the line is not valid text ({exc.reason}); not sent", file=sys.stderr)
                continue
            text = line.strip()
            if text in ("/exit", "/quit"):
                return
            if text and not self.command(text):
                self.answer(text)

    def command(self, text: str) -> bool:
        """Carry out ``/reset``, ``/system TEXT``, ``/think on|off`` or ``/image PATH``; False for other text."""
        if text == "/reset":
            self.history = []
            self.images = []
            print("(conversation cleared)")
        elif text == "/image" or text.startswith("/image "):
            self.attach(text[len("/image") :].strip())
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

    def attach(self, path: str) -> None:
        """Read and decode the image at ``path`` and keep it for the next message (an error is one line)."""
        from ..chat.messages import ImagePart
        from ..vision.preprocess import decode_image, image_bytes

        if not path:
            print("error: /image needs a file: /image PATH", file=sys.stderr)
            return
        try:
            data = image_bytes(Path(path).expanduser())
            decode_image(data)
        except RKLLMError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return
        self.images.append(ImagePart(data=data))
        count = f"{len(self.images)} images" if len(self.images) > 1 else "it"
        print(f"(image {Path(path).name} attached: {count} will go with your next message)")

    def answer(self, text: str) -> None:
        """Stream the answer to ``text``; Ctrl-C stops it (and aborts the run), an error is reported."""
        from ..chat.messages import ChatMessage
        from ..chat.options import ChatOptions

        stream = None
        try:
            images, self.images = tuple(self.images), []
            self.history.append(ChatMessage("user", text, images=images))  # refused when it is not valid text
            messages = ([ChatMessage("system", self.system)] if self.system else []) + self.history
            stream = self.engine.stream(self.model, messages, ChatOptions(enable_thinking=self.thinking))
            self._show(stream)
            self.answered += 1
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # aborts the generation on the NPU; the program goes on
            self._drop_question()
            self.answered += 1  # stopped by the user, not failed
            print(f"{self.reset}\n(stopped)")
        except RKLLMError as exc:
            self._drop_question()
            self.failed += 1
            print(f"{self.reset}\nerror: {exc}", file=sys.stderr)

    def _drop_question(self) -> None:
        """Forget the question of an answer that did not come."""
        if self.history and self.history[-1].role == "user":
            self.history.pop()

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
