"""Multimodal runs on both ABIs: images encoded by the RKNN simulator reach the RKLLM simulator's "model".

The RKNN simulator's encoder puts a region's mean R, G, B (0-1) in the first three values of each
token; the RKLLM simulator names the dominant colour of each image it receives
("I see a mostly red image"), so an answer naming the right colour proves the pixels went through
both native layers. Every test also checks that the simulator saw no multimodal contract violation.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rkllm_core.errors import ImageError, InvalidParameterError, RunError
from rkllm_core.native import abi12, abi13
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.multimodal import check_image_count
from rkllm_core.native.rknn import RKNNLibrary
from rkllm_core.params import ImageTags, InitParams
from rkllm_core.runtime import RKLLMRuntime
from rkllm_core.runtime.run import RunStream
from rkllm_core.sim import RKNNSimulatorControl, SimulatorControl, make_encoder, make_model
from rkllm_core.vision import FAMILIES, ImageEmbedding, ImageEncoder
from tests import rknn_fixtures

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim

QWEN = FAMILIES["qwen2.5-vl"]
TAGS = ImageTags(QWEN.img_start, QWEN.img_end, QWEN.img_content)
WIDTH = 6  # the encoder's embed width, declared as the model's hidden size
MODEL = "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm"
WITH_TAGS = InitParams(image_tags=TAGS)
RED, BLUE, GREEN = (230, 20, 20), (10, 30, 220), (20, 200, 40)


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(out, "PNG")
    return out.getvalue()


@dataclass(frozen=True)
class FakeImage:
    """An embedding that does not check itself (as a third-party encoder's might not)."""

    data: bytes
    n_tokens: int
    width: int


@pytest.fixture
def encoder(rknn_lib: RKNNLibrary, rknn_sim: RKNNSimulatorControl, tmp_path: Path) -> Iterator[ImageEncoder]:
    path = make_encoder(tmp_path, "vision.rknn", height=32, width=48, tokens=16, embed=WIDTH)
    enc = ImageEncoder(path, family=QWEN, library=rknn_lib, soc="rk3588")
    yield enc
    enc.close()


@pytest.fixture
def vlm(sim_lib: RuntimeLibrary, sim: SimulatorControl, model_dir: Path) -> Iterator[Callable[..., RKLLMRuntime]]:
    made: list[RKLLMRuntime] = []

    def factory(params: InitParams | None = WITH_TAGS, hidden_size: int = WIDTH) -> RKLLMRuntime:
        path = make_model(model_dir, MODEL, hidden_size=hidden_size)
        rt = RKLLMRuntime(path, params=params, library=sim_lib)
        made.append(rt)
        return rt

    yield factory
    for rt in made:
        rt.close()
    assert sim.counter("multimodal_violations") == 0, "the binding sent a multimodal input the runtime refuses"


def size_of(enc: ImageEncoder) -> tuple[int, int]:
    return enc.geometry.height, enc.geometry.width


def test_layouts_of_the_multimodal_input_match_the_header() -> None:
    for version, module in (("1.2.3", abi12), ("1.3.0", abi13)):
        layout = json.loads((Path(__file__).parent / "data" / f"layout-{version}-lp64.json").read_text())
        facts = layout["RKLLMMultiModalInput"]
        assert ctypes.sizeof(module.RKLLMMultiModalInput) == facts["size"]
        for name, offset in facts["fields"].items():
            outer, _, inner = name.partition(".")
            found = getattr(module.RKLLMMultiModalInput, outer).offset
            if inner:
                found += getattr(type(getattr(module.RKLLMMultiModalInput(), outer)), inner).offset
            assert found == offset, (version, name)
    assert ctypes.sizeof(abi12.RKLLMMultiModalInput) == 48 and ctypes.sizeof(abi13.RKLLMMultiModalInput) == 144


@pytest.mark.parametrize(("colour", "name"), [(RED, "red"), (BLUE, "blue"), (GREEN, "green")])
def test_the_model_sees_the_colour_of_the_image(
    encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime], sim: SimulatorControl, colour: Any, name: str
) -> None:
    rt = vlm()
    emb = encoder.encode_image(png(colour))
    prompt = "<image>What is in this picture?"
    before = sim.counter("prefilled_tokens")
    text_only = rt.generate(prompt)
    text_tokens = sim.counter("prefilled_tokens") - before
    answer = rt.generate(prompt, images=[emb], image_size=size_of(encoder))
    assert answer.text.startswith(f"I see a mostly {name} image.")
    assert not text_only.text.startswith("I see")
    assert sim.counter("prefilled_tokens") - before - 2 * text_tokens == emb.n_tokens  # image tokens prefilled


def test_several_images_are_concatenated_in_prompt_order(
    encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime], sim: SimulatorControl
) -> None:
    rt = vlm()
    images = [encoder.encode_image(png(c)) for c in (BLUE, RED, BLUE)]
    sim.set("trace", 1)
    answer = rt.generate("Compare <image> and <image> with <image>.", images=images, image_size=size_of(encoder))
    assert answer.text.startswith("I see images: a mostly blue image, a mostly red image, a mostly blue image.")
    run = next(c for c in sim.trace() if c["fn"] == "rkllm_run")
    assert (run["input_type"], run["n_image"], run["n_image_tokens"]) == (3, 3, images[0].n_tokens)
    assert (run["image_height"], run["image_width"]) == size_of(encoder)


def test_an_image_count_that_differs_from_the_tags_is_refused_before_the_runtime(
    encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime], sim: SimulatorControl
) -> None:
    rt = vlm()
    emb = encoder.encode_image(png(RED))
    runs = sim.counter("runs")
    with pytest.raises(ImageError) as err:
        rt.generate("<image> and <image>", images=[emb], image_size=size_of(encoder))
    assert err.value.reason == "image-count" and "2" in str(err.value) and "1 image" in str(err.value)
    with pytest.raises(ImageError, match="0 <image>"):
        rt.generate("no tag here", images=[emb], image_size=size_of(encoder))
    assert sim.counter("runs") == runs


def test_embeddings_of_the_wrong_size_are_refused(
    encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime], sim: SimulatorControl
) -> None:
    rt = vlm()
    emb = encoder.encode_image(png(RED))
    short = FakeImage(emb.data[:-4], emb.n_tokens, emb.width)
    other = ImageEmbedding(bytes(4 * 2 * emb.n_tokens * emb.width), emb.n_tokens, 2 * emb.width)
    runs = sim.counter("runs")
    for images in ([short], [emb, other]):
        prompt = "<image>" * len(images)
        with pytest.raises(ImageError) as err:
            rt.generate(prompt, images=images, image_size=size_of(encoder))
        assert err.value.reason == "embedding-size"
    with pytest.raises(InvalidParameterError, match="image_size"):
        rt.generate("<image>", images=[emb], image_size=(0, 48))
    with pytest.raises(InvalidParameterError, match="image_size"):
        rt.generate("<image>", images=[emb])
    assert sim.counter("runs") == runs


def test_several_images_for_qwen3_vl_are_refused_on_1_2_only(
    encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime], sim: SimulatorControl, abi: str
) -> None:
    rt = vlm()
    images = [encoder.encode_image(png(c)) for c in (RED, BLUE)]
    family = FAMILIES["qwen3-vl"]
    runs = sim.counter("runs")
    options: dict[str, Any] = {"images": images, "image_size": size_of(encoder), "multi_image_abi12": False}
    if abi == "1.2":
        with pytest.raises(ImageError, match="qwen3-vl") as err:
            rt.check_images(2, multi_image_abi12=family.multi_image_abi12, family=family.name)
        assert err.value.reason == "multi-image"
        with pytest.raises(ImageError):
            rt.generate("<image><image>", **options)
        assert sim.counter("runs") == runs
        assert "mostly red" in rt.generate("<image>", **{**options, "images": images[:1]}).text
    else:
        rt.check_images(2, multi_image_abi12=family.multi_image_abi12, family=family.name)
        assert "red image, a mostly blue" in rt.generate("<image><image>", **options).text
    check_image_count(abi, 2, multi_image_abi12=True)  # Qwen2.5-VL: several images on both


def test_image_tags_are_values_and_part_of_the_init_params() -> None:
    same = InitParams(image_tags=ImageTags("<img>", "</img>", "<IMG_CONTEXT>"))
    assert same == InitParams(image_tags=ImageTags("<img>", "</img>", "<IMG_CONTEXT>"))
    assert hash(same) == hash(InitParams(image_tags=ImageTags("<img>", "</img>", "<IMG_CONTEXT>")))
    assert same != InitParams(image_tags=TAGS) and same != InitParams()
    assert len({same, replace(same), InitParams(image_tags=TAGS)}) == 2
    with pytest.raises(InvalidParameterError):
        ImageTags("<img>", "</img>", "")
    with pytest.raises(InvalidParameterError):
        ImageTags("<img>\0", "</img>", "x")


def test_tags_go_at_init_on_1_2_and_with_the_run_on_1_3(
    encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime], sim: SimulatorControl, abi: str
) -> None:
    emb = encoder.encode_image(png(RED))
    other = ImageTags("<img>", "</img>", "<IMG_CONTEXT>")
    sim.set("trace", 1)
    rt = vlm()
    rt.generate("<image>", images=[emb], image_size=size_of(encoder))
    calls = sim.trace()
    init = next(c for c in calls if c["fn"] == "rkllm_init")
    run = next(c for c in calls if c["fn"] == "rkllm_run")
    if abi == "1.2":
        assert (init["img_start"], init["img_end"], init["img_content"]) == (TAGS.start, TAGS.end, TAGS.content)
        assert "image_content" not in run
        with pytest.raises(InvalidParameterError, match="fixed the image tags at init"):
            rt.generate("<image>", images=[emb], image_size=size_of(encoder), image_tags=other)
        bare = vlm(InitParams())
        with pytest.raises(InvalidParameterError, match="at init"):
            bare.generate("<image>", images=[emb], image_size=size_of(encoder), image_tags=TAGS)
    else:
        assert "img_content" not in init
        assert (run["image_start"], run["image_end"], run["image_content"]) == (TAGS.start, TAGS.end, TAGS.content)
        sim.clear_trace()
        rt.generate("<image>", images=[emb], image_size=size_of(encoder), image_tags=other)
        run = next(c for c in sim.trace() if c["fn"] == "rkllm_run")
        assert run["image_content"] == "<IMG_CONTEXT>"
        bare = vlm(InitParams())
        assert "mostly red" in bare.generate("<image>", images=[emb], image_size=(32, 48), image_tags=TAGS).text
        with pytest.raises(InvalidParameterError, match="image_tags"):
            bare.generate("<image>", images=[emb], image_size=size_of(encoder))


def test_image_options_without_images_are_refused(vlm: Callable[..., RKLLMRuntime]) -> None:
    rt = vlm()
    with pytest.raises(InvalidParameterError, match="image_size"):
        rt.generate("hello", image_size=(32, 48))
    assert rt.generate("hello", multi_image_abi12=False).text.startswith("Echo: hello")


def test_the_kv_state_names_the_images_the_cache_holds(encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime]) -> None:
    rt = vlm()
    red, blue = encoder.encode_image(png(RED)), encoder.encode_image(png(BLUE))
    size = size_of(encoder)
    with rt.session() as s:
        s.generate("<image>describe", images=[red], image_size=size, keep_history=True)
        s.mark_kv("conversation")
        held: list[tuple[str, ...]] = [s.kv.images]
        assert s.kv.tag == "conversation"
        s.generate("and now?", keep_history=True)
        s.mark_kv("conversation+1")
        s.generate("<image>this one", images=[blue], image_size=size, keep_history=True, image_digests=["blue.png"])
        held.append(s.kv.images)  # nothing declared for this epoch yet
        s.mark_kv("conversation+2")
        held.append(s.kv.images)
        s.generate("<image>forget", images=[red], image_size=size)  # keep_history=False empties the cache
        s.mark_kv("fresh")
        held.append(s.kv.images)
        s.generate("<image>again", images=[red], image_size=size, keep_history=True)
        s.clear_kv_cache()
        s.mark_kv("cleared")
        held.append(s.kv.images)
    red_digest = hashlib.sha256(red.data).hexdigest()
    assert held == [(red_digest,), (), (red_digest, "blue.png"), (), ()]


def test_the_simulator_counts_what_breaks_the_multimodal_contract(
    encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime], sim: SimulatorControl, abi: str
) -> None:
    rt = vlm()
    emb = encoder.encode_image(png(RED))
    backend = rt.library.backend
    good = backend.image_request("<image>", [emb], image_size=size_of(encoder), init_image_tags=TAGS)
    bad = [
        replace(good, n_image=2),  # one <image> tag, two images
        replace(good, image_width=0),
    ]
    if abi == "1.3":
        bad.append(replace(good, tags=(b"", b"", b"")))  # no content tag
    for multimodal in bad:
        before = sim.counter("multimodal_violations")
        if multimodal.n_image == 2:
            multimodal = replace(multimodal, embed=multimodal.embed * 2)
        req = backend.run_request("<image>", multimodal=multimodal)
        with rt.session() as s, pytest.raises(RunError):
            list(RunStream(functools.partial(s._start, req), rt._state.abort_run))
        assert sim.counter("multimodal_violations") == before + 1
    no_width = vlm(hidden_size=0)
    with pytest.raises(RunError):
        no_width.generate("<image>", images=[emb], image_size=size_of(encoder))
    sim.reset()  # the violations above were deliberate


def test_async_runs_take_images_too(encoder: ImageEncoder, vlm: Callable[..., RKLLMRuntime]) -> None:
    rt = vlm()
    emb = encoder.encode_image(png(BLUE))

    async def main() -> str:
        parts = [c.text async for c in rt.astream("<image>colour?", images=[emb], image_size=size_of(encoder))]
        return "".join(parts)

    assert asyncio.run(main()).startswith("I see a mostly blue image.")


def test_a_deepstack_encoders_interleaved_rows_reach_the_model(
    rknn_lib: RKNNLibrary, rknn_sim: RKNNSimulatorControl, tmp_path: Path, vlm: Callable[..., RKLLMRuntime]
) -> None:
    path = make_encoder(tmp_path, "deepstack.rknn", height=32, width=32, tokens=9, embed=WIDTH, outputs=4)
    with ImageEncoder(path, family=FAMILIES["qwen3-vl"], library=rknn_lib, soc="rk3588") as enc:
        emb = enc.encode_image(png(GREEN))
        size = (enc.geometry.height, enc.geometry.width)
    assert emb.width == 4 * WIDTH
    rt = vlm(hidden_size=4 * WIDTH)
    assert rt.generate("<image>", images=[emb], image_size=size).text.startswith("I see a mostly green image.")
