"""The chat engine serves images: encoded once, sent with the run, kept in the KV cache across turns.

Both simulators run: the RKNN one encodes each image into per-region mean colours, the RKLLM one
names the dominant colour of each image it receives, so an answer naming the right colour proves
the pixels reached the model through the engine. The fixtures fail a test that leaks a handle, a
context or an output; each test also checks the RKLLM simulator saw no multimodal violation.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage, ImagePart
from rkllm_core.chat.options import ChatOptions
from rkllm_core.chat.promptcache import PromptCacheStore
from rkllm_core.chat.vision import image_cache
from rkllm_core.errors import ContextLengthError, ImageError, InvalidParameterError, ModelKindError, RKLLMError
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.native.rknn import RKNNLibrary
from rkllm_core.sim import RKNNSimulatorControl, SimulatorControl, make_encoder, make_model
from tests import rknn_fixtures

rknn_sim_path, rknn_lib, rknn_sim = rknn_fixtures.rknn_sim_path, rknn_fixtures.rknn_lib, rknn_fixtures.rknn_sim

TOKENS, EMBED = 48, 6  # the simulated encoder: 48 image tokens of 6 floats (the VL model's hidden size)
RED, BLUE, GREEN = (230, 20, 20), (10, 30, 220), (20, 200, 40)
VL = "qwen2.5-vl-3b"


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def ask(text: str, *colours: tuple[int, int, int]) -> ChatMessage:
    return ChatMessage("user", text, images=tuple(ImagePart(data=png(c)) for c in colours))


@pytest.fixture
def vl_dir(model_dir: Path) -> Path:
    """A Qwen2.5-VL model with its encoder, a Qwen3-VL pair (four outputs), and a text model."""
    make_model(model_dir / "vl", "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=EMBED, think=False)
    make_encoder(model_dir / "vl", "qwen2.5-vl-3b_vision_rk3588.rknn", height=32, width=32, tokens=TOKENS, embed=EMBED)
    make_model(model_dir / "vl3", "qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", hidden_size=4 * EMBED, think=False)
    make_encoder(
        model_dir / "vl3", "qwen3-vl-2b_vision_rk3588.rknn", height=32, width=32, tokens=8, embed=EMBED, outputs=4
    )
    make_model(model_dir, "Qwen3-0.6B-w8a8-rk3588.rkllm")
    return model_dir


@pytest.fixture
def engine_for(
    vl_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, rknn_lib: RKNNLibrary, rknn_sim: RKNNSimulatorControl
) -> Iterator[Callable[..., ChatEngine]]:
    made: list[ModelManager] = []
    image_cache().clear()

    def factory(directory: Path = vl_dir, **options: object) -> ChatEngine:
        manager = ModelManager(
            ModelRegistry([directory], platform=None),
            library=sim_lib,
            rknn_library=rknn_lib,
            preflight=False,
            max_loaded=4,
            memory_budget_mb=None,
        )
        made.append(manager)
        return ChatEngine(manager, **{"prompt_cache": False, **options})  # type: ignore[arg-type]

    yield factory
    for manager in made:
        manager.close()
    image_cache().clear()
    assert sim.counter("multimodal_violations") == 0, "the engine sent a multimodal input the runtime refuses"


@pytest.mark.parametrize(("colour", "name"), [(RED, "red"), (BLUE, "blue"), (GREEN, "green")])
def test_the_answer_names_the_colour_of_the_image(
    engine_for: Callable[..., ChatEngine], colour: tuple[int, int, int], name: str
) -> None:
    done = engine_for().chat(VL, [ask("What is in this picture?", colour)])
    assert done.text.startswith(f"I see a mostly {name} image.")
    assert done.usage.input_tokens >= TOKENS  # the image's tokens are part of the context


def test_an_image_from_a_path_reaches_the_model(engine_for: Callable[..., ChatEngine], tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(png(BLUE))
    done = engine_for().chat(VL, [ChatMessage("user", "Describe it.", images=(ImagePart(url=str(path)),))])
    assert done.text.startswith("I see a mostly blue image.")


def test_a_follow_up_turn_reuses_the_kv_cache_and_the_image_is_not_prefilled_or_encoded_again(
    engine_for: Callable[..., ChatEngine], sim: SimulatorControl, rknn_sim: RKNNSimulatorControl
) -> None:
    engine = engine_for()
    turn1 = [ask("What colour is this?", RED)]
    first = engine.chat(VL, turn1)
    assert first.text.startswith("I see a mostly red image.") and rknn_sim.counter("runs") == 1
    turn2 = [*turn1, first.message, ChatMessage("user", "Are you sure?")]
    before = sim.counter("prefilled_tokens")
    second = engine.chat(VL, turn2)
    reused = sim.counter("prefilled_tokens") - before
    assert second.kv_reused and second.usage.prefilled_tokens == reused
    # the same turn on a rebuild prefills the whole history, image included (and the encoder is not run)
    before = sim.counter("prefilled_tokens")
    rebuilt = engine_for(reuse_kv=False).chat(VL, turn2)
    rebuild = sim.counter("prefilled_tokens") - before
    assert not rebuilt.kv_reused and rebuild - reused >= TOKENS
    assert rknn_sim.counter("runs") == 1  # one distinct image, one encoder run, over three requests


def test_two_images_in_two_turns_each_reach_the_model(engine_for: Callable[..., ChatEngine], abi: str) -> None:
    engine = engine_for()
    turn1 = [ask("And this one?", RED)]
    first = engine.chat(VL, turn1)
    turns = [*turn1, first.message, ask("And this one?", BLUE)]
    second = engine.chat(VL, turns)
    assert second.kv_reused and second.text.startswith("I see a mostly blue image.")
    # rebuilt, the whole conversation goes as one run with both images in prompt order
    rebuilt = engine_for(reuse_kv=False).chat(VL, [*turns, second.message, ChatMessage("user", "Compare them.")])
    assert rebuilt.text.startswith("I see images: a mostly red image, a mostly blue image.")


def test_several_images_in_one_message_on_a_one_image_family(engine_for: Callable[..., ChatEngine], abi: str) -> None:
    engine = engine_for()
    message = ask("Compare these.", GREEN, RED)
    if abi == "1.2":  # Qwen3-VL takes one image per prompt on runtime 1.2
        with pytest.raises(ImageError) as err:
            engine.chat("qwen3-vl-2b", [message])
        assert err.value.reason == "multi-image"
    else:
        done = engine.chat("qwen3-vl-2b", [message])
        assert done.text.startswith("I see images: a mostly green image, a mostly red image.")


async def test_async_requests_take_images(engine_for: Callable[..., ChatEngine]) -> None:
    done = await engine_for().achat(VL, [ask("What is this?", GREEN)])
    assert done.text.startswith("I see a mostly green image.")


def test_images_to_a_text_model_are_refused_before_it_loads(engine_for: Callable[..., ChatEngine]) -> None:
    engine = engine_for()
    with pytest.raises(ModelKindError, match="chat model"):
        engine.chat("qwen3-0.6b", [ask("What is this?", RED)])
    assert not engine.manager.loaded()


def test_undecodable_or_remote_images_are_refused_before_the_model_loads(engine_for: Callable[..., ChatEngine]) -> None:
    engine = engine_for()
    for part, reason in (
        (ImagePart(data=b"not an image at all"), "not-an-image"),
        (ImagePart(data=png(RED)[:60]), None),
        (ImagePart(data=b'<svg xmlns="http://www.w3.org/2000/svg"/>'), "unsupported-format"),
        (ImagePart(url="https://example.com/cat.png"), "remote-disabled"),
    ):
        with pytest.raises(ImageError) as err:
            engine.chat(VL, [ChatMessage("user", "What is this?", images=(part,))])
        assert reason is None or err.value.reason == reason
    assert not engine.manager.loaded()


def test_too_many_images_for_the_context_are_refused(engine_for: Callable[..., ChatEngine]) -> None:
    engine = engine_for()
    many = ChatMessage("user", "All of them.", images=(ImagePart(data=png(RED)),) * 25)  # 25 x 196 > 4096
    with pytest.raises(ContextLengthError):
        engine.chat(VL, [many])
    assert not engine.manager.loaded()


def test_a_vision_model_without_an_encoder_serves_text_and_refuses_images(
    engine_for: Callable[..., ChatEngine], model_dir: Path
) -> None:
    alone = model_dir / "alone"
    make_model(alone, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=EMBED, think=False)
    engine = engine_for(alone)
    with pytest.raises(ModelKindError, match="without an image encoder"):
        engine.chat(VL, [ask("What is this?", RED)])
    assert not engine.chat(VL, [ChatMessage("user", "Hello")]).text.startswith("I see")


def test_an_unknown_family_or_a_corrupt_encoder_is_a_typed_error(
    engine_for: Callable[..., ChatEngine], model_dir: Path
) -> None:
    odd = model_dir / "odd"
    make_model(odd, "mysterymodel-2b_w8a8_rk3588.rkllm", hidden_size=EMBED, think=False)
    make_encoder(odd, "mystery-encoder.rknn", height=32, width=32, tokens=TOKENS, embed=EMBED)
    (odd / "rkllm-models.toml").write_text('[models."mysterymodel-2b"]\nvision_encoder = "mystery-encoder.rknn"\n')
    engine = engine_for(odd)
    with pytest.raises(InvalidParameterError, match="vision = "):  # the lines to add to rkllm-models.toml
        engine.chat("mysterymodel-2b", [ask("What is this?", RED)])
    broken = model_dir / "broken"
    make_model(broken, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=EMBED, think=False)
    (broken / "qwen2.5-vl-3b_vision_rk3588.rknn").write_bytes(b"this is not an rknn model")
    with pytest.raises(RKLLMError):
        engine_for(broken).chat(VL, [ask("What is this?", RED)])


def test_a_text_request_and_an_image_request_share_one_instance(engine_for: Callable[..., ChatEngine]) -> None:
    engine = engine_for()
    with engine.manager.lease(VL):  # a plain lease (a preload, a CLI's check) loads it as the engine wants it
        pass
    engine.chat(VL, [ChatMessage("user", "Hello")])
    engine.chat(VL, [ask("What is this?", RED)])
    assert len([e for e in engine.manager.loaded() if e.info.name == VL]) == 1


def test_the_prompt_cache_of_a_fresh_conversation_is_keyed_by_its_images(
    engine_for: Callable[..., ChatEngine], sim: SimulatorControl, tmp_path: Path
) -> None:
    system = ChatMessage("system", " ".join(f"Rule {i}: describe images plainly and briefly." for i in range(40)))
    store = PromptCacheStore(tmp_path / "cache")
    engine = engine_for(prompt_cache=store)
    first = engine.chat(VL, [system, ask("What is this?", RED)])
    assert first.text.startswith("I see a mostly red image.") and sim.counter("prompt_cache_saves") == 1
    other = engine_for(prompt_cache=store).chat(VL, [system, ask("What is this?", BLUE)])
    assert other.text.startswith("I see a mostly blue image.")
    assert sim.counter("prompt_cache_loads") == 0  # another image: the red one's prefill is not loaded
    again = engine_for(prompt_cache=store).chat(VL, [system, ask("What is this?", RED)])
    assert again.text.startswith("I see a mostly red image.") and sim.counter("prompt_cache_loads") == 1


def test_a_batched_model_refuses_images_with_a_clear_error(engine_for: Callable[..., ChatEngine], vl_dir: Path) -> None:
    (vl_dir / "rkllm-models.toml").write_text('[models."qwen2.5-vl-3b"]\nn_batch = 2\n')
    engine = engine_for()
    with pytest.raises(InvalidParameterError, match="n_batch"):
        engine.chat(VL, [ask("What is this?", RED)])
    assert not engine.manager.loaded()


def test_the_planner_counts_the_encoders_image_tokens_in_the_context(
    engine_for: Callable[..., ChatEngine], model_dir: Path
) -> None:
    small = model_dir / "small"
    make_model(small, "Qwen2.5-VL-3B-Instruct-w8a8-rk3588.rkllm", hidden_size=EMBED, think=False, max_context=512)
    make_encoder(small, "qwen2.5-vl-3b_vision_rk3588.rknn", height=32, width=32, tokens=300, embed=EMBED)
    (small / "rkllm-models.toml").write_text(f'[models."{VL}"]\nmax_context_len = 512\n')
    engine = engine_for(small)  # the family says 196 tokens an image; this encoder gives 300
    options = ChatOptions(max_new_tokens=64)
    assert engine.chat(VL, [ask("What is this?", RED)], options).text.startswith("I see a mostly red image.")
    with pytest.raises(ContextLengthError):
        engine.chat(VL, [ask("What is this?", RED)], ChatOptions(max_new_tokens=256))  # 300 + 256 > 512
