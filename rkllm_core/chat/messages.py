"""Framework-free chat messages and the options of a chat request.

The adapters translate LangChain / LlamaIndex messages into these; the chat
engine maps them onto what the runtime accepts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidParameterError
from ..params import SamplingParams
from .parse import StopSequenceFilter

__all__ = [
    "ChatMessage",
    "ChatOptions",
    "MessageRole",
    "ToolCallRequest",
    "ToolChoice",
    "normalise_tools",
    "validate_messages",
]

MessageRole = Literal["system", "user", "assistant", "tool"]
ToolChoice = str | None
"""``None``/``"auto"``, ``"none"``, ``"required"``/``"any"``, or a tool name."""

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """A tool call made by the assistant (``arguments`` is a JSON object)."""

    id: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> tuple[str, str]:
        """(name, arguments as canonical JSON): what identifies the call in a prompt."""
        return self.name, json.dumps(self.arguments, sort_keys=True, ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation.

    Attributes:
        role: ``system``, ``user``, ``assistant`` or ``tool``.
        content: the text (may be empty for an assistant message that only calls tools).
        name: an optional speaker name (rendered as ``name: content`` for user messages).
        tool_calls: the calls an assistant message made.
        tool_call_id: for a ``tool`` message, the call it answers.
    """

    role: MessageRole
    content: str = ""
    name: str | None = None
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        """Check the role and the kinds of the fields."""
        if self.role not in _ROLES:
            raise InvalidParameterError(f"message role must be one of {', '.join(_ROLES)}; got {self.role!r}")
        if not isinstance(self.content, str):
            raise InvalidParameterError(f"message content must be a str, got {type(self.content).__name__}")
        if "\0" in self.content:
            raise InvalidParameterError("message content contains a NUL character")
        if self.tool_calls and self.role != "assistant":
            raise InvalidParameterError("only assistant messages can carry tool_calls")

    def fingerprint(self) -> tuple[Any, ...]:
        """What must match for this message to count as already in the KV cache.

        Tool-call ids are left out: they never reach the prompt.
        """
        return (
            self.role,
            self.content.strip(),
            self.name,
            tuple(c.canonical() for c in self.tool_calls),
        )


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """Settings of one chat request.

    Attributes:
        sampling: sampling settings (per run on the 1.3 ABI; an instance per setting on 1.2).
        max_new_tokens: output limit (``None``: the model's default).
        stop: stop sequences; the text stops before the first one found.
        enable_thinking: let the model reason in a ``<think>`` block (reported separately).
        tools: OpenAI-style tool definitions.
        tool_choice: ``None``/``"auto"``, ``"none"``, ``"required"``/``"any"`` or a tool name.
        timeout: seconds to wait for the model before ``BusyError``.
    """

    sampling: SamplingParams | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    enable_thinking: bool = False
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: ToolChoice = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        """Validate limits, stops and tool choice."""
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1
        ):
            raise InvalidParameterError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            raise InvalidParameterError("stop must be a sequence of strings, not a single string")
        StopSequenceFilter(self.stop)  # validates every stop string
        if self.timeout is not None and (not isinstance(self.timeout, int | float) or math.isnan(self.timeout)):
            raise InvalidParameterError("timeout must be a number of seconds")
        choice = self.tool_choice
        if choice not in (None, "auto", "none", "required", "any") and not (
            isinstance(choice, str) and choice in self.tool_names()
        ):
            raise InvalidParameterError(
                f"tool_choice must be 'auto', 'none', 'required', 'any' or one of the tool names "
                f"{list(self.tool_names())}; got {choice!r}"
            )

    def tool_names(self) -> tuple[str, ...]:
        """Names of the tools, in order."""
        return tuple(_tool_name(t) for t in self.tools)

    @property
    def active_tools(self) -> tuple[Mapping[str, Any], ...]:
        """The tools offered to the model (none when ``tool_choice`` is ``"none"``)."""
        return () if self.tool_choice == "none" else self.tools


def _tool_name(tool: Mapping[str, Any]) -> str:
    fn = tool.get("function", tool)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InvalidParameterError(f"a tool definition has no name: {tool!r}")
    return name


def normalise_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """Return tools as canonical JSON (OpenAI ``{"type": "function", "function": {...}}`` form).

    Raises:
        InvalidParameterError: a tool has no name or is not JSON-serialisable.
    """
    out = []
    for tool in tools:
        _tool_name(tool)
        out.append(dict(tool) if "function" in tool else {"type": "function", "function": dict(tool)})
    try:
        return json.dumps(out, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"tool definitions are not JSON-serialisable: {exc}") from exc


def validate_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Check a conversation can be answered and return it as a list.

    Raises:
        InvalidParameterError: empty, not ChatMessages, or not ending with a user or tool message.
    """
    msgs = list(messages)
    if not msgs:
        raise InvalidParameterError("the message list is empty")
    for m in msgs:
        if not isinstance(m, ChatMessage):
            raise InvalidParameterError(f"expected ChatMessage, got {type(m).__name__}")
    if msgs[-1].role not in ("user", "tool"):
        raise InvalidParameterError(
            f"the last message must be from the user or a tool result, not {msgs[-1].role!r}: "
            "the runtime cannot continue an assistant message"
        )
    return msgs
