"""Images in core chat messages: the value, what identifies it in a conversation, and no silent drop."""

from __future__ import annotations

import pytest

from rkllm_core.chat.engine import _request_messages
from rkllm_core.chat.messages import ChatMessage, ImagePart
from rkllm_core.chat.options import ChatOptions
from rkllm_core.errors import InvalidParameterError


def test_an_image_is_bytes_or_a_url_never_both_or_neither() -> None:
    assert ImagePart(data=b"\x89PNG").key().startswith("sha256:")
    assert ImagePart(url="data:image/png;base64,AAAA").key() == "url:data:image/png;base64,AAAA"
    for bad in ({}, {"data": b"x", "url": "y"}, {"data": "not bytes"}, {"url": ""}):
        with pytest.raises(InvalidParameterError):
            ImagePart(**bad)  # type: ignore[arg-type]


def test_only_user_messages_carry_images() -> None:
    image = ImagePart(data=b"png")
    assert ChatMessage("user", "what is this?", images=(image,)).images == (image,)
    with pytest.raises(InvalidParameterError, match="only user messages"):
        ChatMessage("assistant", "a cat", images=(image,))
    with pytest.raises(InvalidParameterError, match="ImagePart"):
        ChatMessage("user", "x", images=(b"png",))  # type: ignore[arg-type]


def test_a_different_image_is_a_different_message_for_the_kv_cache() -> None:
    red, blue = ImagePart(data=b"red"), ImagePart(data=b"blue")
    same = ChatMessage("user", "what colour?", images=(red,))
    assert same.fingerprint() == ChatMessage("user", "what colour?", images=(ImagePart(data=b"red"),)).fingerprint()
    assert same.fingerprint() != ChatMessage("user", "what colour?", images=(blue,)).fingerprint()
    assert same.fingerprint() != ChatMessage("user", "what colour?").fingerprint()


def test_the_engine_keeps_images_through_its_request_forms() -> None:
    image = ImagePart(data=b"png")
    msgs = [ChatMessage("user", "what is this?", images=(image,))]
    assert _request_messages(msgs, ChatOptions())[-1].images == (image,)
    as_json = _request_messages(msgs, ChatOptions(response_format={"type": "json_object"}))
    assert as_json[-1].images == (image,) and as_json[-1].content != msgs[-1].content
