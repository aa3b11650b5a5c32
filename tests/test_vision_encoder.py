"""The encoder resource against the librknnrt simulator, whose tokens are the mean colour of image regions.

The simulated encoder cuts its input into a grid of gh x gw regions (gh * gw == tokens, gh the
largest divisor <= sqrt(tokens)); element k of a token in output j is the region's mean of channel
k % 3 (0-1) plus j. So the tests can see which colour reached which region, in which channel.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rkllm_core.errors import BusyError, HandleClosedError, InvalidParameterError, ModelFileError, RKNNError
from rkllm_core.native.rknn import RKNNLibrary, RKNNTensorFormat, TensorAttr
from rkllm_core.sim import RKNNSimulatorControl, make_encoder
from rkllm_core.vision import encoder as encoder_module
from rkllm_core.vision.encoder import EncoderGeometry, ImageEmbedding, ImageEncoder, core_mask_for
from rkllm_core.vision.families import VisionFamily
from tests import rknn_fixtures

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim
FILL = 128 / 255
Make = Callable[..., ImageEncoder]


def png(image: Image.Image, **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **save)
    return out.getvalue()


def tokens(embedding: ImageEmbedding) -> list[list[float]]:
    values = embedding.floats()
    return [list(values[i * embedding.width : (i + 1) * embedding.width]) for i in range(embedding.n_tokens)]


def rgb(token: list[float]) -> tuple[float, float, float]:
    return token[0], token[1], token[2]


def close_to(a: tuple[float, ...], b: tuple[float, ...], tol: float = 0.02) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture
def make(rknn_lib: RKNNLibrary, rknn_sim: RKNNSimulatorControl, tmp_path: Path) -> Iterator[Make]:
    made: list[ImageEncoder] = []

    def factory(family: VisionFamily | None = None, soc: str | None = "rk3588", **header: object) -> ImageEncoder:
        shape: dict[str, Any] = {"height": 64, "width": 64, "tokens": 16, "embed": 6, **header}
        path = make_encoder(tmp_path, f"enc{len(made)}.rknn", **shape)
        enc = ImageEncoder(path, family=family, library=rknn_lib, soc=soc)
        made.append(enc)
        return enc

    yield factory
    for enc in made:
        enc.close()


def test_all_geometry_comes_from_the_encoders_attributes(make: Make) -> None:
    enc = make(height=96, width=80, tokens=12, embed=5, outputs=3)
    assert enc.geometry == EncoderGeometry(96, 80, "nhwc", 1, 12, 5, 3)
    assert (enc.pixel_spec.height, enc.pixel_spec.width, enc.pixel_spec.nbytes) == (96, 80, 96 * 80 * 3)
    emb = enc.encode_image(png(Image.new("RGB", (10, 10), (0, 0, 255))))
    assert (emb.n_tokens, emb.width, emb.nbytes) == (12, 15, 12 * 15 * 4)
    assert enc.sdk_version.api.startswith("2.3.2") and enc.sdk_version.driver
    assert enc.memory_bytes > 0


def test_a_red_image_is_seen_as_red_and_channels_keep_their_order(make: Make) -> None:
    enc = make()
    for colour in [(255, 0, 0), (200, 100, 30)]:
        emb = enc.encode_image(png(Image.new("RGB", (32, 32), colour)))
        expected = tuple(c / 255 for c in colour)
        assert all(close_to(rgb(t), expected, 0.005) for t in tokens(emb)), colour


def test_the_right_pixels_reach_the_right_tokens(make: Make) -> None:
    enc = make()  # a 4 x 4 grid of tokens
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((0, 255, 0), (48, 0, 64, 16))  # the top-right region only
    got = [rgb(t) for t in tokens(enc.encode_image(png(image)))]
    assert close_to(got[3], (0, 1, 0)) and all(close_to(g, (0, 0, 0)) for i, g in enumerate(got) if i != 3)


def test_a_wide_image_is_padded_on_top_and_bottom_with_the_fill(make: Make) -> None:
    wide = png(Image.new("RGB", (128, 64), (255, 0, 0)))  # pad rows are the top and bottom quarters
    for family, fill in [(None, (FILL,) * 3), (VisionFamily("x", 64, 16, 6, fill=(0, 0, 255)), (0.0, 0.0, 1.0))]:
        got = [rgb(t) for t in tokens(make(family=family).encode_image(wide))]
        rows = [got[r * 4 : r * 4 + 4] for r in range(4)]
        assert all(close_to(c, fill, 0.03) for c in rows[0] + rows[3]), rows
        assert all(close_to(c, (1.0, 0.0, 0.0), 0.03) for c in rows[1] + rows[2]), rows


def test_a_tall_image_is_padded_left_and_right(make: Make) -> None:
    got = [rgb(t) for t in tokens(make().encode_image(png(Image.new("RGB", (32, 64), (0, 255, 0)))))]
    columns = [[got[r * 4 + c] for r in range(4)] for c in range(4)]
    assert all(close_to(x, (FILL,) * 3, 0.03) for x in columns[0] + columns[3])
    assert all(close_to(x, (0.0, 1.0, 0.0), 0.03) for x in columns[1] + columns[2])


def test_an_exif_rotated_image_encodes_like_the_upright_one(make: Make) -> None:
    upright = Image.new("RGB", (64, 64), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 32, 64, 64))  # red above blue
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    enc = make()
    reference = enc.encode_image(png(upright))
    assert enc.encode_image(png(stored, exif=exif)).data == reference.data
    assert enc.encode_image(png(stored)).data != reference.data  # without the tag it is another image
    top = rgb(tokens(reference)[0])
    assert close_to(top, (1.0, 0.0, 0.0))


def test_several_outputs_are_interleaved_per_token(make: Make) -> None:
    enc = make(tokens=4, embed=3, outputs=4)
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 32))  # token 0 white, the others black
    rows = tokens(enc.encode_image(png(image)))
    assert len(rows) == 4 and all(len(r) == 12 for r in rows)
    for i, row in enumerate(rows):
        base = 1.0 if i == 0 else 0.0
        for j in range(4):  # output j's 3 values for token i, side by side
            assert close_to(tuple(row[j * 3 : j * 3 + 3]), (base + j,) * 3, 0.01), (i, j, row)


def test_every_output_is_released_and_the_context_destroyed(make: Make, rknn_sim: RKNNSimulatorControl) -> None:
    enc = make(outputs=4)
    for _ in range(3):
        enc.encode_image(png(Image.new("RGB", (8, 8))))
    assert rknn_sim.counter("outputs_released") == 12 and rknn_sim.counter("outputs_outstanding") == 0
    assert rknn_sim.counter("live_contexts") == 1
    enc.close()
    enc.close()  # idempotent
    assert rknn_sim.counter("live_contexts") == 0 and rknn_sim.counter("destroys") == 1
    with pytest.raises(HandleClosedError):
        enc.encode(bytes(enc.pixel_spec.nbytes))


def test_host_normalised_nchw_float_input(make: Make) -> None:
    family = VisionFamily("x", 64, 16, 6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    enc = make(family=family, fmt="nchw", input_type="float32")
    assert enc.geometry.layout == "nchw" and enc.pixel_spec.dtype == "float32"
    assert enc.pixel_spec.nbytes == 64 * 64 * 3 * 4
    got = [rgb(t) for t in tokens(enc.encode_image(png(Image.new("RGB", (8, 8), (255, 0, 255)))))]
    assert all(close_to(g, (1.0, -2.0, 1.0), 0.001) for g in got)


@pytest.mark.parametrize(("soc", "platform", "mask"), [("rk3588s", "rk3588", 7), ("rk3576", "rk3576", 3)])
def test_the_core_mask_follows_the_soc(
    make: Make, rknn_sim: RKNNSimulatorControl, soc: str, platform: str, mask: int
) -> None:
    assert make(soc=soc, platform=platform).core_mask == mask
    assert rknn_sim.counter("last_core_mask") == mask


def test_the_core_mask_is_auto_off_a_known_board(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_module, "detect_board_platform", lambda: None)
    assert make(soc=None).core_mask == 0
    assert core_mask_for("rv1126b") == 0


def test_a_rejected_core_mask_is_an_error_and_nothing_stays_loaded(make: Make, rknn_sim: RKNNSimulatorControl) -> None:
    with pytest.raises(RKNNError, match="rknn_set_core_mask returned -5") as info:
        make(soc="rk3588", platform="rk3576")  # three cores asked of a two-core encoder
    assert info.value.function == "rknn_set_core_mask"
    rknn_sim.set("fail_core_mask", 1)
    with pytest.raises(RKNNError, match="rknn_set_core_mask returned -1"):
        make()
    assert rknn_sim.counter("live_contexts") == 0


def test_a_missing_or_corrupt_encoder_file(
    rknn_lib: RKNNLibrary, rknn_sim: RKNNSimulatorControl, tmp_path: Path
) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        ImageEncoder(tmp_path / "none.rknn", library=rknn_lib)
    bad = tmp_path / "bad.rknn"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(RKNNError, match=r"rknn_init returned -6 \(RKNN_ERR_MODEL_INVALID\) \(.*bad.rknn\)"):
        ImageEncoder(bad, library=rknn_lib, soc="rk3588")
    assert rknn_sim.counter("live_contexts") == 0
    rknn_sim.reset()


@pytest.mark.parametrize(("setting", "call"), [("fail_run", "rknn_run"), ("fail_outputs_get", "rknn_outputs_get")])
def test_native_failures_during_a_run_name_the_call(
    make: Make, rknn_sim: RKNNSimulatorControl, setting: str, call: str
) -> None:
    enc = make()
    rknn_sim.set(setting, 1)
    with pytest.raises(
        RKNNError,
        match=f"{call} returned -1",
    ):
        enc.encode(bytes(enc.pixel_spec.nbytes))
    rknn_sim.set(setting, 0)
    assert enc.encode(bytes(enc.pixel_spec.nbytes)).n_tokens == 16  # still usable


def test_pixels_of_the_wrong_size_are_refused_before_the_runtime(make: Make, rknn_sim: RKNNSimulatorControl) -> None:
    enc = make()
    with pytest.raises(InvalidParameterError, match=f"takes {64 * 64 * 3} bytes"):
        enc.encode(b"\0" * 10)
    assert rknn_sim.counter("runs") == 0


def test_two_threads_share_one_encoder_one_run_at_a_time(make: Make, rknn_sim: RKNNSimulatorControl) -> None:
    enc = make()
    rknn_sim.set("run_delay_ms", 5)
    colours = {0: (255, 0, 0), 1: (0, 0, 255)}
    images = {n: png(Image.new("RGB", (16, 16), c)) for n, c in colours.items()}
    wrong: list[str] = []
    start = threading.Barrier(2)

    def worker(n: int) -> None:
        start.wait()
        for _ in range(5):
            got = rgb(tokens(enc.encode_image(images[n]))[5])
            if not close_to(got, tuple(c / 255 for c in colours[n])):
                wrong.append(f"thread {n} got {got}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in colours]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not wrong and rknn_sim.counter("runs") == 10
    assert rknn_sim.counter("max_active_runs") == 1  # the fixture also checks concurrent_run_violations == 0


def test_waiting_for_a_busy_encoder_is_bounded(make: Make) -> None:
    enc = make()
    enc._lock.acquire()  # as a run in progress does
    try:
        with pytest.raises(BusyError, match="busy") as info:
            enc.encode(bytes(enc.pixel_spec.nbytes), timeout=0.01)
        assert info.value.waited == 0.01
        with pytest.raises(BusyError):
            enc.close(timeout=0.01)
    finally:
        enc._lock.release()


def test_an_encoder_that_is_not_an_image_encoder_is_refused(
    make: Make, rknn_sim: RKNNSimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bad_geometry(*args: object) -> EncoderGeometry:
        raise ModelFileError("input 0 is not an RGB image tensor")

    monkeypatch.setattr(encoder_module, "read_geometry", bad_geometry)
    with pytest.raises(ModelFileError):
        make()
    assert rknn_sim.counter("live_contexts") == 0  # the context made before the check was destroyed


@pytest.mark.parametrize(
    ("dims", "expected"),
    [((1, 196, 2048), (196, 2048)), ((1, 1, 256, 896), (256, 896)), ((196, 1536), (196, 1536))],
)
def test_tokens_are_the_first_dimension_above_one_and_the_width_follows(
    dims: tuple[int, ...], expected: tuple[int, int]
) -> None:
    attr = TensorAttr(0, dims, 3, 1, "out", 0, 0)
    assert encoder_module._output_geometry(attr, Path("enc.rknn")) == expected


def test_input_geometry_follows_the_reported_format() -> None:
    nhwc, nchw = int(RKNNTensorFormat.RKNN_TENSOR_NHWC), int(RKNNTensorFormat.RKNN_TENSOR_NCHW)
    geometry = encoder_module._input_geometry
    assert geometry(TensorAttr(0, (1, 448, 392, 3), nhwc, 1, "in", 0, 0), Path("e")) == (448, 392, "nhwc")
    assert geometry(TensorAttr(0, (1, 3, 476, 470), nchw, 0, "in", 0, 0), Path("e")) == (476, 470, "nchw")
    for dims, fmt in [((1, 448, 448, 4), nhwc), ((1, 448, 448, 3), nchw), ((448, 448, 3), nhwc)]:
        with pytest.raises(ModelFileError, match="not an RGB image tensor"):
            geometry(TensorAttr(0, dims, fmt, 1, "in", 0, 0), Path("e"))
    with pytest.raises(ModelFileError, match="no token dimension"):
        encoder_module._output_geometry(TensorAttr(0, (1, 1, 1), 3, 1, "out", 0, 0), Path("e"))
