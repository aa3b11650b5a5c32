"""Framework-free chat messages (the options of a request are in :mod:`.options`).

The adapters translate LangChain / LlamaIndex messages into these; the chat
engine maps them onto what the runtime accepts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidParameterError
from ..params import check_text

__all__ = [
    "ChatMessage",
    "ImagePart",
    "MessageRole",
    "ToolCallRequest",
    "append_instruction",
    "validate_messages",
]

MessageRole = Literal["system", "user", "assistant", "tool"]
_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """A tool call made by the assistant (``arguments`` is a JSON object)."""

    id: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the name and that the arguments are a JSON object of valid text."""
        check_text(self.name, "tool call name")
        if not isinstance(self.arguments, Mapping):
            raise InvalidParameterError(f"tool call {self.name!r}: arguments must be a JSON object")
        try:
            text = json.dumps(self.arguments, ensure_ascii=False, allow_nan=False, default=str)
        except ValueError as exc:
            raise InvalidParameterError(f"tool call {self.name!r}: arguments are not valid JSON ({exc})") from exc
        check_text(text, f"tool call {self.name!r} arguments")

    def canonical(self) -> tuple[str, str]:
        """(name, arguments as canonical JSON): what identifies the call in a prompt."""
        return self.name, json.dumps(self.arguments, sort_keys=True, ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image in a user message: its encoded bytes, or where to read them.

    Exactly one of the two is given. The image is decoded only when a vision model
    answers (``rkllm_core.vision``); a text model refuses it.

    Attributes:
        data: the encoded image (PNG, JPEG, WebP, ...).
        url: a ``data:`` URL, a local path or ``file:`` URL (in-process use only: the server
            never passes one on), or an ``http(s)`` URL, fetched only when the request's
            :attr:`ChatOptions.allow_remote_images <rkllm_core.chat.options.ChatOptions>` says so.
    """

    data: bytes | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        """Check that exactly one of ``data`` and ``url`` is given, of the right type."""
        if (self.data is None) == (self.url is None):
            raise InvalidParameterError("an image needs exactly one of data (bytes) and url")
        if self.data is not None and not isinstance(self.data, bytes | bytearray | memoryview):
            raise InvalidParameterError(f"image data must be bytes, got {type(self.data).__name__}")
        if self.url is not None and (not isinstance(self.url, str) or not self.url):
            raise InvalidParameterError("an image url must be a non-empty string")

    def key(self) -> str:
        """What identifies this image in a conversation: the sha256 of its bytes, or its url."""
        if self.data is not None:
            return "sha256:" + hashlib.sha256(self.data).hexdigest()
        return "url:" + str(self.url)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation.

    Attributes:
        role: ``system``, ``user``, ``assistant`` or ``tool``.
        content: the text (may be empty for an assistant message that only calls tools).
        name: an optional speaker name (rendered as ``name: content`` for user messages).
        tool_calls: the calls an assistant message made.
        tool_call_id: for a ``tool`` message, the call it answers.
        images: images of a ``user`` message; in the prompt they come before its text, in order.
    """

    role: MessageRole
    content: str = ""
    name: str | None = None
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None
    images: tuple[ImagePart, ...] = ()

    def __post_init__(self) -> None:
        """Check the role, and that every text is text the runtime can take."""
        if self.role not in _ROLES:
            raise InvalidParameterError(f"message role must be one of {', '.join(_ROLES)}; got {self.role!r}")
        check_text(self.content, f"{self.role} message content")
        if self.name is not None:
            check_text(self.name, f"{self.role} message name")
        if self.tool_calls and self.role != "assistant":
            raise InvalidParameterError("only assistant messages can carry tool_calls")
        if self.images and self.role != "user":
            raise InvalidParameterError("only user messages can carry images")
        if not all(isinstance(image, ImagePart) for image in self.images):
            raise InvalidParameterError("message images must be ImagePart values")

    def fingerprint(self) -> tuple[Any, ...]:
        """What must match for this message to count as already in the KV cache.

        Tool-call ids are left out: they never reach the prompt.
        """
        return (
            self.role,
            self.content.strip(),
            self.name,
            tuple(c.canonical() for c in self.tool_calls),
            tuple(image.key() for image in self.images),
        )


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


def append_instruction(messages: list[ChatMessage], instruction: str) -> list[ChatMessage]:
    """Append ``instruction`` to the last user message, or add it as a user message after a tool result."""
    if messages and messages[-1].role == "user":
        last = messages[-1]
        joined = f"{last.content}\n\n{instruction}" if last.content else instruction
        return [*messages[:-1], ChatMessage("user", joined, name=last.name, images=last.images)]
    return [*messages, ChatMessage("user", instruction)]
