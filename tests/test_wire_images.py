"""Images in server requests: OpenAI ``image_url`` parts and Ollama ``images``, read into ImageParts.

Pure wire tests (no model): data URLs are decoded here within the size limit, http(s) URLs pass only
when the server allows remote images, and a path or ``file:`` URL from a request is never taken.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from rkllm_core.chat.messages import ImagePart
from rkllm_core.serve import ServerSettings, wire
from rkllm_core.serve import ollama_wire as ow
from rkllm_core.serve.wire import WireError
from rkllm_core.serve.wire_images import DEFAULT_MAX_IMAGE_BYTES, ImagePolicy, body_limit_for

RAW = b"\x89PNG\r\n\x1a\n-some-image-bytes"
DATA_URL = "data:image/png;base64," + base64.b64encode(RAW).decode()
REMOTE = "https://example.com/cat.png"


def openai_body(*parts: Any, role: str = "user") -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": role, "content": [{"type": "text", "text": "What?"}, *parts]}]}


def image_url(url: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def test_data_urls_are_decoded_and_images_keep_their_order() -> None:
    other = "data:image/jpeg;base64," + base64.b64encode(b"jpeg-bytes").decode()
    req = wire.chat_request(openai_body(image_url(DATA_URL), image_url(other)))
    [message] = req.messages
    assert message.content == "What?" and message.images == (ImagePart(data=RAW), ImagePart(data=b"jpeg-bytes"))
    assert req.options.allow_remote_images is False


def test_remote_urls_need_the_server_flag() -> None:
    with pytest.raises(WireError, match="--allow-remote-images") as err:
        wire.chat_request(openai_body(image_url(REMOTE)))
    assert err.value.param == "messages[0].content[1].image_url.url"
    req = wire.chat_request(
        openai_body({"type": "image_url", "image_url": REMOTE}), images=ImagePolicy(allow_remote=True)
    )
    assert req.messages[0].images == (ImagePart(url=REMOTE),)
    assert req.options.allow_remote_images is True  # the fetch itself is the model side's, with its limits


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("/etc/passwd", "never reads local files"),
        ("file:///etc/passwd", "never reads local files"),
        ("ftp://example.com/a.png", "never reads local files"),
        ("data:image/png,%89PNG", "base64 data URL"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        ("", "non-empty URL"),
        (42, "non-empty URL"),
    ],
)
def test_bad_image_urls_get_a_400_naming_the_field(url: Any, error: str) -> None:
    with pytest.raises(WireError, match=error) as err:
        wire.chat_request(openai_body(image_url(url)), images=ImagePolicy(allow_remote=True))
    assert err.value.param == "messages[0].content[1].image_url.url"


def test_images_outside_user_messages_and_other_parts_are_refused() -> None:
    with pytest.raises(WireError, match="user messages only") as err:
        wire.chat_request(openai_body(image_url(DATA_URL), role="system"))
    assert err.value.param == "messages[0].content[1]"
    with pytest.raises(WireError, match="'input_audio'"):
        wire.chat_request(openai_body({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}))


def test_the_size_limit_applies_to_the_decoded_image_in_both_formats() -> None:
    policy = ImagePolicy(max_bytes=len(RAW))
    assert wire.chat_request(openai_body(image_url(DATA_URL)), images=policy).messages[0].images
    big = "data:image/png;base64," + base64.b64encode(RAW + b"!").decode()
    with pytest.raises(WireError, match=f"limit of {len(RAW)} bytes"):
        wire.chat_request(openai_body(image_url(big)), images=policy)
    huge = base64.b64encode(b"x" * (len(RAW) * 4)).decode()
    for body in (
        {"model": "m", "messages": [{"role": "user", "content": "?", "images": [huge]}]},
        {"model": "m", "prompt": "?", "images": [huge]},
    ):
        read = ow.chat_request if "messages" in body else ow.generate_request
        with pytest.raises(WireError, match="image limit") as err:
            read(body, images=policy)
        assert err.value.param in ("messages[0].images[0]", "images[0]")


def test_ollama_images_must_be_a_list_of_base64_strings() -> None:
    for value, error in (("aGk=", "must be a list"), ([b"hi"], "base64 string"), ([DATA_URL], "base64")):
        with pytest.raises(WireError, match=error):
            ow.chat_request({"model": "m", "messages": [{"role": "user", "content": "?", "images": value}]})
    only_images = ow.generate_request({"model": "m", "images": [base64.b64encode(RAW).decode()]})
    assert [(m.role, m.content, m.images) for m in only_images.messages] == [("user", "", (ImagePart(data=RAW),))]


def test_the_default_body_limit_leaves_room_for_the_largest_image_in_base64() -> None:
    settings = ServerSettings()
    assert settings.max_image_bytes == DEFAULT_MAX_IMAGE_BYTES
    assert settings.max_body_bytes == body_limit_for(DEFAULT_MAX_IMAGE_BYTES)
    assert len(base64.b64encode(b"x" * DEFAULT_MAX_IMAGE_BYTES)) < settings.max_body_bytes
    assert settings.images == ImagePolicy(max_bytes=DEFAULT_MAX_IMAGE_BYTES, allow_remote=False)


def test_base64_wrapped_in_lines_is_taken_as_the_base64_tool_prints_it() -> None:
    wrapped = base64.encodebytes(RAW * 10).decode()  # 76-character lines
    assert "\n" in wrapped
    req = ow.chat_request({"model": "m", "messages": [{"role": "user", "content": "?", "images": [wrapped]}]})
    assert req.messages[0].images == (ImagePart(data=RAW * 10),)
