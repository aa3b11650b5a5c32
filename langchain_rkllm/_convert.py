"""Translation between LangChain messages and ``rkllm_core`` chat messages."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from rkllm_core.chat.messages import ChatMessage as CoreMessage
from rkllm_core.chat.messages import MessageRole, ToolCallRequest
from rkllm_core.errors import InvalidParameterError

__all__ = ["UnsupportedContentError", "to_core_messages"]

# Content-block types that carry a modality the runtime cannot take, by the name used in errors.
_MODALITIES: dict[str, str] = {
    "image": "image",
    "image_url": "image",
    "input_image": "image",
    "audio": "audio",
    "input_audio": "audio",
    "file": "file (PDF or other document)",
    "input_file": "file (PDF or other document)",
    "document": "file (PDF or other document)",
    "video": "video",
    "video_url": "video",
}
_TEXT_BLOCKS = frozenset({"text", "input_text", "output_text"})
# Blocks an assistant message may carry next to its text: tool calls travel in ``tool_calls``,
# reasoning is never sent back to the model.
_AI_SKIPPED_BLOCKS = frozenset(
    {
        "tool_use",
        "tool_call",
        "tool_call_chunk",
        "invalid_tool_call",
        "function_call",
        "server_tool_call",
        "server_tool_call_chunk",
        "server_tool_result",
        "reasoning",
        "thinking",
        "redacted_thinking",
    }
)
_CHAT_ROLES: dict[str, MessageRole] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "tool": "tool",
    "function": "tool",
}


class UnsupportedContentError(InvalidParameterError):
    """A message carries content the RKLLM runtime cannot take (image, audio, file, video).

    A ``ValueError``; nothing reached the runtime.

    Attributes:
        modality: what was refused, e.g. ``"image"``.
    """

    def __init__(self, message: str, *, modality: str) -> None:
        super().__init__(message)
        self.modality = modality


def _describe(index: int, message: BaseMessage) -> str:
    return f"message {index} ({type(message).__name__})"


def _text_of(content: str | list[Any], *, index: int, message: BaseMessage, assistant: bool) -> str:
    """The text of a message: a string, or the text blocks of a block list joined.

    Assistant blocks are joined without a separator (they are pieces of one reply, as
    ``AIMessage.text`` joins them); blocks of other messages are separate parts and are
    joined with a newline.
    """
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        if not isinstance(block, Mapping):
            raise InvalidParameterError(
                f"{_describe(index, message)}: content blocks must be strings or dicts, got {type(block).__name__}"
            )
        kind = block.get("type")
        if kind in _TEXT_BLOCKS:
            text = block.get("text", "")
            if not isinstance(text, str):
                raise InvalidParameterError(f"{_describe(index, message)}: a text block's 'text' must be a str")
            parts.append(text)
        elif isinstance(kind, str) and kind in _MODALITIES:
            modality = _MODALITIES[kind]
            raise UnsupportedContentError(
                f"ChatRKLLM cannot take {modality} input: the RKLLM runtime takes text only "
                f"(a {kind!r} content block in {_describe(index, message)})",
                modality=modality.split(" ")[0],
            )
        elif assistant and kind in _AI_SKIPPED_BLOCKS:
            continue
        elif kind is None and isinstance(message, ToolMessage):
            parts.append(json.dumps(block, ensure_ascii=False, default=str))  # a tool's raw JSON output
        else:
            raise InvalidParameterError(
                f"{_describe(index, message)}: unsupported content block type {kind!r}; "
                "ChatRKLLM takes text blocks only"
            )
    return ("" if assistant else "\n").join(parts)


def _tool_calls(message: AIMessage) -> tuple[ToolCallRequest, ...]:
    calls = []
    for i, call in enumerate(message.tool_calls):
        args = call.get("args") or {}
        if not isinstance(args, Mapping):
            raise InvalidParameterError(f"tool call {call.get('name')!r} has non-object args: {args!r}")
        calls.append(ToolCallRequest(call.get("id") or f"call_{i}", call["name"], dict(args)))
    return tuple(calls)


def to_core_messages(messages: Sequence[BaseMessage]) -> list[CoreMessage]:
    """Translate LangChain messages into ``rkllm_core`` chat messages.

    Names are kept; text content blocks are joined; an image, audio, file or video
    block raises :class:`UnsupportedContentError`.

    Raises:
        InvalidParameterError: an unknown message type or role, or an unsupported block.
    """
    out: list[CoreMessage] = []
    for i, m in enumerate(messages):
        name = m.name if isinstance(m.name, str) and m.name else None
        if isinstance(m, AIMessage):
            text = _text_of(m.content, index=i, message=m, assistant=True)
            out.append(CoreMessage("assistant", text, name=name, tool_calls=_tool_calls(m)))
        elif isinstance(m, HumanMessage):
            out.append(CoreMessage("user", _text_of(m.content, index=i, message=m, assistant=False), name=name))
        elif isinstance(m, SystemMessage):
            out.append(CoreMessage("system", _text_of(m.content, index=i, message=m, assistant=False), name=name))
        elif isinstance(m, ToolMessage):
            text = _text_of(m.content, index=i, message=m, assistant=False)
            out.append(CoreMessage("tool", text, name=name, tool_call_id=m.tool_call_id))
        elif isinstance(m, FunctionMessage):
            out.append(CoreMessage("tool", _text_of(m.content, index=i, message=m, assistant=False), name=name))
        elif isinstance(m, ChatMessage):
            role = _CHAT_ROLES.get(m.role.lower())
            if role is None:
                raise InvalidParameterError(
                    f"{_describe(i, m)}: unknown role {m.role!r}; use one of {', '.join(sorted(_CHAT_ROLES))}"
                )
            text = _text_of(m.content, index=i, message=m, assistant=role == "assistant")
            out.append(CoreMessage(role, text, name=name))
        else:
            raise InvalidParameterError(f"{_describe(i, m)}: ChatRKLLM cannot send this message type")
    return out
