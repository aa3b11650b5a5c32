"""From an image as callers have it (bytes, a path, a data: URL, a URL) to the encoder's input tensor.

Decoding uses Pillow (the ``vision`` extra), imported on first use. The steps, as Rockchip's
multimodal demo does them: decode, apply the EXIF orientation, convert to RGB (not BGR), pad to a
centred square with the encoder's fill colour, resize bilinearly to the encoder's H×W, and lay the
pixels out as the encoder's input attributes say (uint8 NHWC for the official encoders; NCHW and
host-normalised float32 for encoders that need it).

Decompression bombs are refused, not shrunk: an image whose header declares more than
``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`, 64 megapixels, about 192 MB decoded) is
an :class:`~rkllm_core.errors.ImageError` before any pixel is decoded, so a 30,000×30,000 image costs
only its header. Remote http(s) URLs are fetched only when the caller allows it, with a size and a
time limit.
"""

from __future__ import annotations

import array
import base64
import binascii
import io
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..errors import ImageError, VisionUnavailableError

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_URL_TIMEOUT",
    "ImageSource",
    "PixelSpec",
    "decode_image",
    "fetch_image_url",
    "image_bytes",
    "pad_to_square",
    "preprocess",
    "to_tensor",
]

DEFAULT_MAX_PIXELS: Final = 64_000_000
"""Images declaring more pixels than this are refused before decoding."""
DEFAULT_MAX_BYTES: Final = 32 * 1024 * 1024
"""The largest encoded image accepted (a file, a data: URL or a download)."""
DEFAULT_URL_TIMEOUT: Final = 10.0
"""Seconds a whole download may take."""
INSTALL_HINT: Final = 'images need Pillow: pip install -e ".[vision]" in your boardllm checkout'

#: What an image can be given as: its encoded bytes, a file path, or a ``data:``/``http(s):``/``file:`` URL.
ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str]


def _pil() -> Any:
    """Import Pillow's ``Image`` module, or raise :class:`VisionUnavailableError` saying how to install it."""
    try:
        from PIL import Image, ImageOps  # noqa: F401  (ImageOps is used through Image's package)
    except ImportError as exc:
        raise VisionUnavailableError(INSTALL_HINT) from exc
    return sys.modules["PIL"]


@dataclass(frozen=True)
class PixelSpec:
    """What the encoder takes: size, layout, element type, and the pad colour and normalisation.

    Attributes:
        height: input height in pixels.
        width: input width in pixels.
        layout: ``"nhwc"`` or ``"nchw"``.
        dtype: ``"uint8"`` (0-255) or ``"float32"`` (``(v / 255 - mean) / std``, or ``v / 255`` without them).
        fill: the RGB pad colour.
        mean: per-channel mean for float32 input (0-1 scale), or None.
        std: per-channel std for float32 input, or None.
    """

    height: int
    width: int
    layout: str = "nhwc"
    dtype: str = "uint8"
    fill: tuple[int, int, int] = (128, 128, 128)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("nhwc", "nchw") or self.dtype not in ("uint8", "float32"):
            raise ValueError(f"unsupported pixel layout/type {self.layout}/{self.dtype}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"bad input size {self.height}x{self.width}")

    @property
    def nbytes(self) -> int:
        """The size of one input tensor in bytes."""
        return self.height * self.width * 3 * (1 if self.dtype == "uint8" else 4)


def fetch_image_url(url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_URL_TIMEOUT) -> bytes:
    """Download an image over http(s), within a size and a time limit.

    Redirects are followed only to http(s). Whether remote URLs are allowed at all is the caller's
    decision (the server keeps them off); this function only fetches.

    Args:
        url: an ``http://`` or ``https://`` URL.
        max_bytes: the largest body accepted.
        timeout: seconds the whole download may take.

    Raises:
        ImageError: not http(s) (``remote-scheme``), larger than ``max_bytes`` (``remote-too-large``),
            slower than ``timeout`` (``remote-timeout``), or the request failed (``remote-failed``).
    """
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ImageError(f"only http(s) image URLs can be fetched, not {url[:80]!r}", reason="remote-scheme")
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    try:
        with opener.open(urllib.request.Request(url, headers={"Accept": "image/*"}), timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(url, max_bytes)
            return _read_limited(response, url, max_bytes, deadline, timeout)
    except ImageError:
        raise
    except TimeoutError as exc:
        raise _too_slow(url, timeout) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(getattr(exc, "reason", None), TimeoutError):
            raise _too_slow(url, timeout) from exc
        raise ImageError(f"fetching image {url[:80]!r} failed: {exc}", reason="remote-failed") from exc


def _read_limited(response: Any, url: str, max_bytes: int, deadline: float, timeout: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise _too_slow(url, timeout)
        chunk = response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(url, max_bytes)
        chunks.append(chunk)


def _too_large(url: str, max_bytes: int) -> ImageError:
    return ImageError(f"image at {url[:80]!r} is larger than {max_bytes} bytes", reason="remote-too-large")


def _too_slow(url: str, timeout: float) -> ImageError:
    return ImageError(f"image at {url[:80]!r} took longer than {timeout:g} s", reason="remote-timeout")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise ImageError(f"image URL redirects to a non-http(s) URL {newurl[:80]!r}", reason="remote-scheme")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _data_url(text: str, max_bytes: int) -> bytes:
    head, sep, payload = text.partition(",")
    if not sep:
        raise ImageError("a data: URL needs a comma before its data", reason="bad-data-url")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageError(f"the data: URL holds more than {max_bytes} bytes", reason="too-large")
    if head.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the data: URL's base64 is invalid: {exc}", reason="bad-data-url") from exc
    return urllib.parse.unquote_to_bytes(payload)


def _read_path(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"image file {path} is larger than {max_bytes} bytes", reason="too-large")
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc.strerror or exc}", reason="unreadable") from exc


def image_bytes(
    source: ImageSource,
    *,
    allow_remote: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_URL_TIMEOUT,
) -> bytes:
    """The encoded bytes of an image given as bytes, a path, or a ``data:``, ``file:`` or ``http(s):`` URL.

    Args:
        source: the image.
        allow_remote: whether http(s) URLs may be fetched (off by default).
        max_bytes: the largest encoded image accepted.
        timeout: seconds a download may take.

    Raises:
        ImageError: unreadable, too large, a bad data: URL, or a remote URL that is not allowed
            (``remote-disabled``) or fails.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageError(f"the image is larger than {max_bytes} bytes", reason="too-large")
        return data
    if isinstance(source, str):
        scheme = source[:8].lower()
        if scheme.startswith("data:"):
            return _data_url(source, max_bytes)
        if scheme.startswith(("http://", "https://")):
            if not allow_remote:
                raise ImageError(
                    f"fetching image URLs is turned off; pass the image's bytes or a data: URL, or allow it "
                    f"(allow_remote_images=True; rkllm serve --allow-remote-images) ({source[:80]!r})",
                    reason="remote-disabled",
                )
            return fetch_image_url(source, max_bytes=max_bytes, timeout=timeout)
        if scheme.startswith("file://"):
            return _read_path(Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path)), max_bytes)
    return _read_path(Path(os.fspath(source)).expanduser(), max_bytes)


# What Pillow's decoders raise on damaged data (struct.error and IndexError from malformed EXIF, among others).
_DECODE_ERRORS: Final = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head) or b"<svg" in head[:256]


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image:
    """Decode an encoded image into an upright RGB Pillow image.

    The EXIF orientation is applied and an alpha channel is dropped (RGB conversion). An image
    declaring more than ``max_pixels`` pixels is refused before decoding. With ``min_side``, a JPEG
    may be decoded at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``), never below ``min_side`` on either
    side: several times faster for a camera photo that is resized to the encoder's size anyway.

    Raises:
        ImageError: not an image (``not-an-image``), SVG or another format Pillow cannot decode
            (``unsupported-format``), truncated (``truncated``), or too large (``too-large``).
        VisionUnavailableError: Pillow is not installed.
    """
    pil = _pil()
    if _looks_like_svg(data):
        raise ImageError("SVG images are not supported: convert to PNG or JPEG", reason="unsupported-format")
    try:
        image = pil.Image.open(io.BytesIO(data))
    except pil.Image.DecompressionBombError as exc:
        raise ImageError(f"the image is too large to decode safely: {exc}", reason="too-large") from exc
    except (pil.UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(
            "the data is not an image Pillow can decode (PNG, JPEG, WebP, GIF, BMP, ...)", reason="not-an-image"
        ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} pixels, more than the limit of {max_pixels}; shrink it first",
            reason="too-large",
        )
    try:
        if min_side is not None:
            image.draft("RGB", (min_side, min_side))
        image.load()
        upright: Image = pil.ImageOps.exif_transpose(image).convert("RGB")
        return upright
    except _DECODE_ERRORS as exc:
        raise ImageError(f"the image is truncated or corrupt: {exc}", reason="truncated") from exc


def pad_to_square(image: Image, fill: tuple[int, int, int]) -> Image:
    """Pad ``image`` to a square, centred, with ``fill`` (an image that is square already is returned)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square: Image = _pil().Image.new("RGB", (side, side), tuple(int(c) for c in fill))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def to_tensor(image: Image, spec: PixelSpec) -> bytes:
    """Pad, resize (bilinear) and lay out an RGB image as ``spec`` says; returns the tensor's bytes."""
    pil = _pil()
    sized = pad_to_square(image, spec.fill).resize((spec.width, spec.height), pil.Image.Resampling.BILINEAR)
    channels = sized.split()
    if spec.dtype == "uint8":
        return sized.tobytes() if spec.layout == "nhwc" else b"".join(ch.tobytes() for ch in channels)
    mean = spec.mean or (0.0, 0.0, 0.0)
    std = spec.std or (1.0, 1.0, 1.0)
    planes = []
    for ch, m, s in zip(channels, mean, std, strict=True):
        scale, offset = 1.0 / (255.0 * s), -m / s
        planes.append(ch.convert("F").point(lambda v, a=scale, b=offset: v * a + b).tobytes())
    if spec.layout == "nchw":
        return b"".join(planes)
    out = array.array("f", bytes(spec.nbytes))
    for c, plane in enumerate(planes):
        out[c::3] = array.array("f", plane)
    return out.tobytes()


def preprocess(
    source: ImageSource,
    spec: PixelSpec,
    *,
    allow_remote: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_URL_TIMEOUT,
) -> bytes:
    """Read, decode and lay out an image for an encoder: :func:`image_bytes`, :func:`decode_image`, :func:`to_tensor`.

    Raises:
        ImageError: see the three steps.
        VisionUnavailableError: Pillow is not installed.
    """
    data = image_bytes(source, allow_remote=allow_remote, max_bytes=max_bytes, timeout=timeout)
    image = decode_image(data, max_pixels=max_pixels, min_side=max(spec.height, spec.width))
    return to_tensor(image, spec)
