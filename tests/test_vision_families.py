"""Per-family vision facts: the known families, how registry families map to them, overrides, refusals."""

from __future__ import annotations

import pytest

from rkllm_core.errors import InvalidParameterError
from rkllm_core.filenames import parse_model_filename
from rkllm_core.vision.families import FAMILIES, VisionFamily, family_key, vision_family


@pytest.mark.parametrize(
    ("filename", "key"),
    [
        ("qwen3-vl-2b-instruct_w8a8_rk3588.rkllm", "qwen3-vl"),
        ("qwen2.5-vl-3b-w8a8_level1_rk3588.rkllm", "qwen2.5-vl"),
        ("Qwen2-VL-2B-Instruct-rk3588.rkllm", "qwen2-vl"),
        ("internvl3-1b_w8a8_rk3588.rkllm", "internvl3"),
        ("internvl3_5-1b_w8a8_rk3588.rkllm", "internvl3"),
        ("MiniCPM-V-2_6-rk3588-w8a8.rkllm", "minicpm-v"),
    ],
)
def test_the_registrys_families_map_to_their_facts(filename: str, key: str) -> None:
    assert family_key(parse_model_filename(filename).family) == key


def test_unrelated_families_do_not_match() -> None:
    assert family_key("qwen3") is None and family_key("internvl") is None and family_key(None) is None
    assert family_key("qwen2-vlx") is None


def test_the_facts_of_each_family() -> None:
    qwen3 = FAMILIES["qwen3-vl"]
    assert (qwen3.image_size, qwen3.tokens_per_image, qwen3.embed_width, qwen3.n_outputs) == (448, 196, 2048, 4)
    assert not qwen3.multi_image_abi12 and FAMILIES["qwen2.5-vl"].multi_image_abi12
    assert (qwen3.img_start, qwen3.img_end, qwen3.img_content) == (
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
    )
    assert FAMILIES["internvl3"].img_content == "<IMG_CONTEXT>" and FAMILIES["minicpm-v"].img_end == "</image>\n"
    assert all(f.fill == (128, 128, 128) and f.mean is None for f in FAMILIES.values())  # official encoders


def test_registry_overrides_replace_fields() -> None:
    got = vision_family("qwen2.5-vl", {"fill": [0, 0, 0], "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]})
    assert got.fill == (0, 0, 0) and got.mean == (0.48, 0.46, 0.41) and got.img_start == "<|vision_start|>"
    assert FAMILIES["qwen2.5-vl"].fill == (128, 128, 128)  # the table is untouched


def test_an_unknown_family_is_refused_with_the_lines_to_add() -> None:
    with pytest.raises(InvalidParameterError, match=r'\[models\."my-vlm"\] vision = \{ image_size = ') as info:
        vision_family("smolvlm", model="my-vlm")
    assert "known families: internvl3, minicpm-v, qwen2-vl, qwen2.5-vl, qwen3-vl" in str(info.value)


def test_an_unknown_family_described_completely_is_accepted() -> None:
    facts = dict(
        image_size=512, tokens_per_image=64, embed_width=960, img_start="<a>", img_end="</a>", img_content="<p>"
    )
    got = vision_family("smolvlm", facts)
    assert got == VisionFamily("smolvlm", 512, 64, 960, img_start="<a>", img_end="</a>", img_content="<p>")


@pytest.mark.parametrize(
    "overrides",
    [{"colour": [1, 2, 3]}, {"mean": [0.5, 0.5, 0.5]}, {"mean": [0.5] * 3, "std": [0, 1, 1]}, {"fill": [0, 0, 300]}],
    ids=["unknown-key", "mean-without-std", "zero-std", "fill-out-of-range"],
)
def test_bad_overrides_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError):
        vision_family("qwen3-vl", overrides)
