"""Images in request bodies, for both wire formats: what a request may send, read into ImageParts.

A request may send image bytes (base64, or a ``data:`` URL), and an ``http(s)`` URL only when the
server allows remote images (``rkllm serve --allow-remote-images``; off by default, since fetching
what a request names lets it reach hosts behind the server). A local path or a ``file:`` URL is never
taken from a request. Every refusal is a :class:`~.wire.WireError` naming the field (a 400).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Final

from ..chat.messages import ImagePart
from .wire_errors import WireError

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "ImagePolicy",
    "base64_image",
    "body_limit_for",
    "image_from_url",
    "ollama_images",
]

DEFAULT_MAX_IMAGE_BYTES: Final = 16 * 1024 * 1024
"""The largest image a request may send, decoded (16 MiB)."""


def body_limit_for(max_image_bytes: int) -> int:
    """A request body limit with room for an image of ``max_image_bytes`` in base64 (4/3 larger) and 4 MiB more."""
    return max_image_bytes * 4 // 3 + 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """What a server takes as images.

    Attributes:
        max_bytes: the largest decoded image a request may send.
        allow_remote: take ``http(s)`` image URLs (the model's side fetches them, with size and time limits).
    """

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    allow_remote: bool = False


def base64_image(text: Any, where: str, policy: ImagePolicy) -> ImagePart:
    """Bare base64 (Ollama's ``images``, a data URL's payload) as an image of at most ``policy.max_bytes``.

    Raises:
        WireError: not a string, not base64, empty or too large (naming ``where``).
    """
    if not isinstance(text, str):
        raise WireError(f"'{where}' must be a base64 string, not {type(text).__name__}", where)
    if len(text) * 3 // 4 > policy.max_bytes + 3:
        raise WireError(f"'{where}' is larger than this server's image limit of {policy.max_bytes} bytes", where)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # base64 wrapped in lines (as `base64` prints it) is base64 too
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise WireError(f"'{where}' is not valid base64 image data ({exc})", where) from exc
    if not data:
        raise WireError(f"'{where}' is empty", where)
    if len(data) > policy.max_bytes:
        raise WireError(f"'{where}' is larger than this server's image limit of {policy.max_bytes} bytes", where)
    return ImagePart(data=data)


def image_from_url(url: Any, where: str, policy: ImagePolicy) -> ImagePart:
    """An OpenAI ``image_url``: a base64 ``data:`` URL (decoded here), or http(s) when the policy allows it.

    Raises:
        WireError: another scheme (a path, ``file:``), a data URL that is not base64, a remote URL
            while remote images are off (naming ``--allow-remote-images``), or an image too large.
    """
    if not isinstance(url, str) or not url:
        raise WireError(f"'{where}' must be a non-empty URL string", where)
    scheme = url[: url.find(":")].lower() if 0 < url.find(":") <= 8 else ""
    if scheme == "data":
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise WireError(f"'{where}' must be a base64 data URL (data:image/png;base64,...)", where)
        return base64_image(payload, where, policy)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise WireError(
                f"'{where}': this server does not fetch remote images; send the image as a base64 data URL, "
                "or start it with --allow-remote-images",
                where,
            )
        return ImagePart(url=url)
    raise WireError(f"'{where}' must be a data: URL or an http(s) URL; the server never reads local files", where)


def ollama_images(value: Any, where: str, role: Any, policy: ImagePolicy) -> tuple[ImagePart, ...]:
    """Ollama's ``images``: a list of bare base64 strings, on a user message (or a generate request).

    Raises:
        WireError: not a list, images on another role, or an entry that is not valid base64.
    """
    if value is None or value == []:
        return ()
    if not isinstance(value, list):
        raise WireError(f"'{where}' must be a list of base64 strings", where)
    if role != "user":
        raise WireError(f"'{where}': images go in user messages only, not {role!r}", where)
    return tuple(base64_image(item, f"{where}[{i}]", policy) for i, item in enumerate(value))
