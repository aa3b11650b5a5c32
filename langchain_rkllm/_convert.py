"""Translation between LangChain messages and ``rkllm_core`` chat messages."""

from __future__ import annotations

import base64
import binascii
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
from rkllm_core.chat.messages import ImagePart, MessageRole, ToolCallRequest
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
_IMAGE_BLOCKS = frozenset(kind for kind, modality in _MODALITIES.items() if modality == "image")
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
    """A message carries content ChatRKLLM cannot pass on (audio, file, video, or an image outside a user message).

    A ``ValueError``; nothing reached the runtime.

    Attributes:
        modality: what was refused, e.g. ``"image"``.
    """

    def __init__(self, message: str, *, modality: str) -> None:
        super().__init__(message)
        self.modality = modality


def _describe(index: int, message: BaseMessage) -> str:
    return f"message {index} ({type(message).__name__})"


def _text_of(
    content: str | list[Any], *, index: int, message: BaseMessage, assistant: bool, images: bool = False
) -> str:
    """The text of a message: a string, or the text blocks of a block list joined.

    Assistant blocks are joined without a separator (they are pieces of one reply, as
    ``AIMessage.text`` joins them); blocks of other messages are separate parts and are
    joined with a newline. With ``images`` (a user message), image blocks are skipped here:
    :func:`_images_of` reads them.
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
        elif images and kind in _IMAGE_BLOCKS:
            continue
        elif isinstance(kind, str) and kind in _MODALITIES:
            raise _refusal(kind, index, message)
        elif assistant and kind in _AI_SKIPPED_BLOCKS:
            continue
        elif kind is None and isinstance(message, ToolMessage):
            parts.append(json.dumps(block, ensure_ascii=False, default=str))  # a tool's raw JSON output
        else:
            raise InvalidParameterError(
                f"{_describe(index, message)}: unsupported content block type {kind!r}; "
                "ChatRKLLM takes text blocks (and image blocks in user messages)"
            )
    return ("" if assistant else "\n").join(parts)


def _refusal(kind: str, index: int, message: BaseMessage) -> UnsupportedContentError:
    modality = _MODALITIES[kind]
    if modality == "image":
        return UnsupportedContentError(
            f"ChatRKLLM cannot take image input here: images go in user (human) messages only "
            f"(a {kind!r} content block in {_describe(index, message)})",
            modality="image",
        )
    return UnsupportedContentError(
        f"ChatRKLLM cannot take {modality} input: the RKLLM runtime takes text and images only "
        f"(a {kind!r} content block in {_describe(index, message)})",
        modality=modality.split(" ")[0],
    )


def _has_images(content: str | list[Any]) -> bool:
    return not isinstance(content, str) and any(
        isinstance(block, Mapping) and block.get("type") in _IMAGE_BLOCKS for block in content
    )


def _image_part(block: Mapping[str, Any], where: str) -> ImagePart:
    """One image block (standard v1, or an OpenAI ``image_url`` LangChain left as non-standard) as an ImagePart."""
    if block.get("type") == "non_standard":
        value = block.get("value")
        url = value.get("image_url") if isinstance(value, Mapping) else None
        if isinstance(url, Mapping):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidParameterError(f"{where}: an image block needs a url, got {dict(block)!r:.120}")
        return ImagePart(url=url)
    if isinstance(block.get("base64"), str):
        try:
            return ImagePart(data=base64.b64decode(block["base64"], validate=True))
        except (binascii.Error, ValueError) as exc:
            raise InvalidParameterError(f"{where}: the image block's base64 is invalid ({exc})") from exc
    if isinstance(block.get("url"), str) and block["url"]:
        return ImagePart(url=block["url"])
    if block.get("file_id") is not None:
        raise UnsupportedContentError(
            f"{where}: an image given by file_id (a provider's upload) cannot be read here; "
            "pass its bytes (base64) or a url",
            modality="image",
        )
    raise InvalidParameterError(f"{where}: an image block needs base64 data or a url")


def _images_of(message: BaseMessage, index: int) -> tuple[ImagePart, ...]:
    """The images of a user message, in order, from LangChain's normalised ``content_blocks``."""
    if not _has_images(message.content):
        return ()
    where = _describe(index, message)
    parts = []
    for block in message.content_blocks:
        if block.get("type") == "image":
            parts.append(_image_part(block, where))
        elif block.get("type") == "non_standard":
            value = block.get("value")
            if isinstance(value, Mapping) and value.get("type") in _IMAGE_BLOCKS:
                parts.append(_image_part(block, where))
    return tuple(parts)


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

    Names are kept; text content blocks are joined. Image blocks of user (human) messages
    become :class:`~rkllm_core.chat.messages.ImagePart` values: LangChain's ``{"type": "image",
    "base64" | "url": ...}`` blocks, OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``
    (a ``data:`` URL or an http(s) one) and the older ``source_type`` blocks, all read through
    ``message.content_blocks``. An image anywhere else, or an audio, file or video block, raises
    :class:`UnsupportedContentError`.

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
            text = _text_of(m.content, index=i, message=m, assistant=False, images=True)
            out.append(CoreMessage("user", text, name=name, images=_images_of(m, i)))
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
            text = _text_of(m.content, index=i, message=m, assistant=role == "assistant", images=role == "user")
            out.append(CoreMessage(role, text, name=name, images=_images_of(m, i) if role == "user" else ()))
        else:
            raise InvalidParameterError(f"{_describe(i, m)}: ChatRKLLM cannot send this message type")
    return out
