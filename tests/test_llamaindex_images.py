"""LlamaIndex ``ImageBlock`` in chat messages becomes the core's ImagePart (translation, no model runs).

Bytes are passed as bytes, a path is read, a URL is passed on (fetched only with
``allow_remote_images``); an image outside a user message is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock

from llamaindex_rkllm import RKLLM
from llamaindex_rkllm.base import to_core_messages
from rkllm_core.chat.messages import ImagePart

RAW = b"\x89PNG\r\n\x1a\n-some-image-bytes"
REMOTE = "https://example.com/cat.png"


def user(*blocks: TextBlock | ImageBlock) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, blocks=list(blocks))


def test_bytes_paths_and_urls_become_image_parts_in_order(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"bytes-from-a-file")
    message = user(
        ImageBlock(image=RAW),
        TextBlock(text="Compare these"),
        ImageBlock(path=photo),
        ImageBlock(url=REMOTE),
        ImageBlock(url="data:image/png;base64,AAAA"),
    )
    [core] = to_core_messages([message])
    assert core.role == "user" and core.content == "Compare these"
    assert core.images == (
        ImagePart(data=RAW),
        ImagePart(data=b"bytes-from-a-file"),
        ImagePart(url=REMOTE),
        ImagePart(url="data:image/png;base64,AAAA"),
    )


def test_an_image_outside_a_user_message_or_an_unreadable_path_is_refused(tmp_path: Path) -> None:
    for role in (MessageRole.ASSISTANT, MessageRole.SYSTEM):
        with pytest.raises(ValueError, match="images in user messages only"):
            to_core_messages([ChatMessage(role=role, blocks=[ImageBlock(image=RAW)])])
    gone = tmp_path / "gone.png"
    gone.write_bytes(RAW)
    block = ImageBlock(path=gone)
    gone.unlink()  # removed between building the message and sending it
    with pytest.raises(ValueError, match="cannot be read"):
        to_core_messages([user(block)])


def test_remote_images_are_off_unless_the_llm_allows_them(tmp_path: Path) -> None:
    params = {"model_dir": str(tmp_path), "library_path": str(tmp_path / "none.so")}
    assert RKLLM("qwen3-0.6b", **params)._options({}).allow_remote_images is False
    options = RKLLM("qwen3-0.6b", allow_remote_images=True, **params)._options({"temperature": 0.3})
    assert options.allow_remote_images is True and options.sampling is not None
