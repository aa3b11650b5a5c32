"""LangChain image content: every form a user message may carry becomes the core's ImagePart.

Translation only (no model runs here): what reaches the chat engine for each block form, the
refusals (an image outside a user message, a provider file id, bad base64), and the remote-image
switch mapped onto the request options.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_rkllm import ChatRKLLM, UnsupportedContentError
from langchain_rkllm._convert import to_core_messages
from rkllm_core.chat.messages import ImagePart
from rkllm_core.errors import InvalidParameterError

RAW = b"\x89PNG\r\n\x1a\n-some-image-bytes"
B64 = base64.b64encode(RAW).decode()
DATA_URL = f"data:image/png;base64,{B64}"
REMOTE = "https://example.com/cat.png"


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"type": "image", "base64": B64, "mime_type": "image/png"}, ImagePart(data=RAW)),
        ({"type": "image", "url": REMOTE}, ImagePart(url=REMOTE)),
        ({"type": "image", "url": "/srv/photos/cat.png"}, ImagePart(url="/srv/photos/cat.png")),
        ({"type": "image_url", "image_url": {"url": DATA_URL}}, ImagePart(data=RAW)),
        ({"type": "image_url", "image_url": {"url": REMOTE, "detail": "low"}}, ImagePart(url=REMOTE)),
        ({"type": "image_url", "image_url": REMOTE}, ImagePart(url=REMOTE)),
        ({"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/png"}, ImagePart(data=RAW)),
        ({"type": "image", "source_type": "url", "url": REMOTE}, ImagePart(url=REMOTE)),
        (
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
            ImagePart(data=RAW),
        ),
    ],
)
def test_every_image_form_of_a_user_message_becomes_an_image_part(block: dict[str, Any], expected: ImagePart) -> None:
    [message] = to_core_messages([HumanMessage([{"type": "text", "text": "What is this?"}, block])])
    assert message.role == "user" and message.content == "What is this?"
    assert message.images == (expected,)


def test_images_keep_their_order_and_the_text_stays_whole() -> None:
    other = base64.b64encode(b"second-image").decode()
    content: list[Any] = [
        {"type": "image", "base64": B64, "mime_type": "image/png"},
        "Compare",
        {"type": "image_url", "image_url": {"url": REMOTE}},
        {"type": "text", "text": "with"},
        {"type": "image", "base64": other, "mime_type": "image/jpeg"},
    ]
    [message] = to_core_messages([HumanMessage(content)])
    assert message.content == "Compare\nwith"
    assert message.images == (ImagePart(data=RAW), ImagePart(url=REMOTE), ImagePart(data=b"second-image"))


def test_a_user_chat_message_carries_images_too() -> None:
    [message] = to_core_messages([ChatMessage(role="user", content=[{"type": "image", "url": REMOTE}, "hi"])])
    assert message.images == (ImagePart(url=REMOTE),) and message.content == "hi"


def test_a_conversation_keeps_images_only_where_they_were() -> None:
    first = HumanMessage([{"type": "image", "base64": B64, "mime_type": "image/png"}, "colour?"])
    out = to_core_messages([SystemMessage("Be brief."), first, AIMessage("Red."), HumanMessage("Sure?")])
    assert [len(m.images) for m in out] == [0, 1, 0, 0]


@pytest.mark.parametrize(
    "message",
    [
        AIMessage([{"type": "image", "base64": B64, "mime_type": "image/png"}]),
        SystemMessage([{"type": "image_url", "image_url": {"url": DATA_URL}}]),
        ToolMessage([{"type": "image", "base64": B64, "mime_type": "image/png"}], tool_call_id="1"),
        ChatMessage(role="assistant", content=[{"type": "image", "url": REMOTE}]),
    ],
)
def test_an_image_outside_a_user_message_is_refused(message: Any) -> None:
    with pytest.raises(UnsupportedContentError, match="user") as info:
        to_core_messages([HumanMessage("hi"), message] if not isinstance(message, AIMessage) else [message])
    assert info.value.modality == "image"


def test_bad_image_blocks_get_one_clear_error_each() -> None:
    with pytest.raises(InvalidParameterError, match="base64 is invalid"):
        to_core_messages([HumanMessage([{"type": "image", "base64": "not base64!", "mime_type": "image/png"}])])
    with pytest.raises(UnsupportedContentError, match="file_id") as info:
        to_core_messages([HumanMessage([{"type": "image", "file_id": "file-123"}])])
    assert info.value.modality == "image"


def test_audio_and_pdf_next_to_an_image_are_still_refused() -> None:
    for block in (
        {"type": "audio", "base64": B64, "mime_type": "audio/wav"},
        {"type": "file", "base64": B64, "mime_type": "application/pdf"},
    ):
        image = {"type": "image", "base64": B64, "mime_type": "image/png"}
        with pytest.raises(UnsupportedContentError, match="text and images only"):
            to_core_messages([HumanMessage([image, block])])


def test_remote_images_are_off_unless_the_model_allows_them(tmp_path: Path) -> None:
    params = {"model": "qwen3-0.6b", "model_dir": str(tmp_path), "library_path": str(tmp_path / "none.so")}
    message = [HumanMessage([{"type": "image", "url": REMOTE}, "what?"])]
    _, core, options = ChatRKLLM(**params)._request(message, None, {})
    assert core[0].images == (ImagePart(url=REMOTE),) and options.allow_remote_images is False
    _, _, options = ChatRKLLM(**params, allow_remote_images=True)._request(message, None, {"temperature": 0.5})
    assert options.allow_remote_images is True and options.sampling is not None
