"""Image input: every accepted form, the exact tensor layouts, and a typed error for each bad input."""

from __future__ import annotations

import base64
import io
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from rkllm_core.errors import ImageError, InvalidParameterError, VisionUnavailableError
from rkllm_core.vision.preprocess import (
    PixelSpec,
    decode_image,
    fetch_image_url,
    image_bytes,
    pad_to_square,
    preprocess,
    to_tensor,
)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with no pixel data to speak of."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


FOUR = Image.new("RGB", (2, 2))
FOUR.putdata([(1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)])


def test_uint8_nhwc_and_nchw_layouts_are_exact() -> None:
    assert to_tensor(FOUR, PixelSpec(2, 2)) == bytes(range(1, 13))
    assert to_tensor(FOUR, PixelSpec(2, 2, "nchw")) == bytes([1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12])


def test_float32_input_is_normalised_per_channel_in_either_layout() -> None:
    image = Image.new("RGB", (2, 2), (255, 0, 51))
    spec = PixelSpec(2, 2, "nhwc", "float32", mean=(0.5, 0.5, 0.1), std=(0.5, 0.25, 0.1))
    values = memoryview(to_tensor(image, spec)).cast("f").tolist()
    assert values == pytest.approx([1.0, -2.0, 1.0] * 4, abs=1e-5)
    planar = memoryview(to_tensor(image, PixelSpec(2, 2, "nchw", "float32"))).cast("f").tolist()
    assert planar == pytest.approx([1.0] * 4 + [0.0] * 4 + [0.2] * 4, abs=1e-5)  # v / 255 without mean/std


def test_padding_is_centred_with_the_fill() -> None:
    square = pad_to_square(Image.new("RGB", (4, 2), (255, 0, 0)), (1, 2, 3))
    assert square.size == (4, 4)
    assert [square.getpixel((0, y)) for y in range(4)] == [(1, 2, 3), (255, 0, 0), (255, 0, 0), (1, 2, 3)]
    same = Image.new("RGB", (3, 3))
    assert pad_to_square(same, (0, 0, 0)) is same


def test_modes_other_than_rgb_become_rgb() -> None:
    for image in [Image.new("L", (4, 4), 200), Image.new("RGBA", (4, 4), (10, 20, 30, 0)), Image.new("P", (4, 4))]:
        assert decode_image(png(image)).mode == "RGB"
    assert decode_image(png(Image.new("L", (1, 1), 200))).getpixel((0, 0)) == (200, 200, 200)


def test_pixel_spec_rejects_what_no_encoder_takes() -> None:
    assert PixelSpec(448, 448).nbytes == 448 * 448 * 3 and PixelSpec(2, 3, dtype="float32").nbytes == 72
    for bad in [dict(layout="nc1hwc2"), dict(dtype="float16"), dict(height=0)]:
        with pytest.raises(ValueError):
            PixelSpec(**{"height": 4, "width": 4, **bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is text, not an image", "not-an-image"),
        (b"", "not-an-image"),
        (png(Image.new("RGB", (64, 64), (9, 9, 9)))[:-40], "truncated"),
        (
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
            "unsupported-format",
        ),
        (b'<svg width="10" height="10"></svg>', "unsupported-format"),
        (png_header_only(30_000, 30_000), "too-large"),
    ],
    ids=["text", "empty", "truncated-png", "svg-xml", "svg", "30000x30000"],
)
def test_bad_images_are_typed_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.reason == reason
    assert isinstance(info.value, InvalidParameterError) and isinstance(info.value, ValueError)


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    data = png(Image.new("RGB", (100, 100)))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match="100x100 pixels, more than the limit of 9999"):
        decode_image(data, max_pixels=9_999)


def test_bytes_paths_and_data_urls_give_the_same_image(tmp_path: Path) -> None:
    data = png(FOUR)
    (tmp_path / "four.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    forms = [data, bytearray(data), memoryview(data), tmp_path / "four.png", str(tmp_path / "four.png")]
    forms += [f"data:image/png;base64,{b64}", (tmp_path / "four.png").as_uri()]
    assert all(image_bytes(f) == data for f in forms)
    assert image_bytes("data:text/plain,a%20b") == b"a b"
    assert preprocess(f"data:image/png;base64,{b64}", PixelSpec(2, 2)) == bytes(range(1, 13))


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("data:image/png;base64,!!!notbase64", "bad-data-url"),
        ("data:image/png;base64", "bad-data-url"),
        ("/no/such/image.png", "unreadable"),
        ("https://example.com/cat.png", "remote-disabled"),
        ("HTTP://example.com/cat.png", "remote-disabled"),
    ],
)
def test_bad_sources_are_typed_errors(source: str, reason: str) -> None:
    with pytest.raises(ImageError) as info:
        image_bytes(source)
    assert info.value.reason == reason


def test_oversized_input_is_refused_in_every_form(tmp_path: Path) -> None:
    data = bytes(1000)
    (tmp_path / "big.png").write_bytes(data)
    for source in [data, tmp_path / "big.png", "data:image/png;base64," + base64.b64encode(data).decode()]:
        with pytest.raises(ImageError) as info:
            image_bytes(source, max_bytes=500)
        assert info.value.reason == "too-large"


def test_missing_pillow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png(FOUR)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(VisionUnavailableError, match=r'pip install -e "\.\[vision\]"') as info:
        decode_image(data)
    assert isinstance(info.value, ImportError)


# --- remote URLs, against a local server -----------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    image = png(FOUR)
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        if self.path == "/slow":
            self.release.wait(timeout=30)  # never sent before the client gives up
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/cat.png")  # urllib alone would follow it
            self.end_headers()
            return
        body = self.image * (50 if self.path == "/big" else 1)
        self.send_response(404 if self.path == "/missing" else 200)
        if self.path != "/unsized":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.release.clear()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=30)


def test_an_allowed_url_is_fetched(server: str) -> None:
    assert image_bytes(f"{server}/cat.png", allow_remote=True) == png(FOUR)
    assert preprocess(f"{server}/cat.png", PixelSpec(2, 2), allow_remote=True) == bytes(range(1, 13))


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/big", "remote-too-large"), ("/unsized", "remote-too-large"), ("/slow", "remote-timeout")]
    + [("/missing", "remote-failed"), ("/redirect", "remote-scheme")],
)
def test_remote_limits(server: str, path: str, reason: str) -> None:
    limit = len(png(FOUR)) * 10 if path == "/big" else len(png(FOUR)) - 1
    with pytest.raises(ImageError) as info:
        fetch_image_url(f"{server}{path}", max_bytes=limit, timeout=0.5)
    assert info.value.reason == reason


def test_only_http_urls_are_fetched() -> None:
    with pytest.raises(ImageError) as info:
        fetch_image_url("file:///etc/hostname")
    assert info.value.reason == "remote-scheme"


def test_a_large_jpeg_may_be_decoded_smaller_but_never_below_the_encoder_size() -> None:
    out = io.BytesIO()
    Image.new("RGB", (1600, 1200), (0, 128, 255)).save(out, "JPEG")
    assert decode_image(out.getvalue()).size == (1600, 1200)
    reduced = decode_image(out.getvalue(), min_side=300)
    assert reduced.size == (400, 300)  # 1/4 scale: both sides still >= 300
    assert decode_image(out.getvalue(), min_side=301).size == (800, 600)
    assert decode_image(png(FOUR), min_side=1).size == (2, 2)  # other formats decode as they are
