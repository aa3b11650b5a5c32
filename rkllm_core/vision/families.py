"""What each vision-language family needs around its encoder: image tags, padding fill, normalisation.

The encoder's own attributes decide the geometry (input size, tokens, width, outputs) when it is
loaded; the sizes here are what the family's published encoders report, for planning before an
encoder is loaded and for showing. Official encoders have mean/std baked in at conversion, so
``mean``/``std`` are ``None`` (the host passes uint8 pixels); a third-party encoder that normalises on
the host declares them in the registry file, which overrides any field (see :func:`vision_family`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Final

from ..errors import InvalidParameterError

__all__ = ["FAMILIES", "VisionFamily", "family_key", "vision_family"]

_QWEN_START: Final = "<|vision_start|>"
_QWEN_END: Final = "<|vision_end|>"
_QWEN_PAD: Final = "<|image_pad|>"


@dataclass(frozen=True)
class VisionFamily:
    """The preprocessing and prompt facts of one vision-language family.

    Attributes:
        name: the family (as the registry names it: ``qwen2.5-vl``).
        image_size: the input side (pixels) of the family's published encoders.
        tokens_per_image: image tokens per image of those encoders.
        embed_width: the embedding width of one encoder output.
        n_outputs: the number of encoder outputs (4 for Qwen3-VL's "deepstack" encoders).
        fill: the RGB colour an image is padded with to a square (127.5 saturates to 128).
        mean: host-side normalisation mean per RGB channel (0-1 scale), or None when baked in.
        std: host-side normalisation std per RGB channel, or None when baked in.
        img_start: the tag before an image's tokens.
        img_end: the tag after them.
        img_content: the token repeated for each image token.
        multi_image_abi12: whether several images in one prompt work on runtime 1.2.x.
    """

    name: str
    image_size: int
    tokens_per_image: int
    embed_width: int
    n_outputs: int = 1
    fill: tuple[int, int, int] = (128, 128, 128)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    img_start: str = ""
    img_end: str = ""
    img_content: str = ""
    multi_image_abi12: bool = True

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise InvalidParameterError(f"vision family {self.name!r}: give mean and std together, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise InvalidParameterError(f"vision family {self.name!r}: std must be positive, got {self.std}")
        if any(not 0 <= c <= 255 for c in self.fill):
            raise InvalidParameterError(f"vision family {self.name!r}: fill must be 0-255 per channel")


#: The known families (facts from Rockchip's multimodal demo and the published encoders).
FAMILIES: Final[dict[str, VisionFamily]] = {
    "qwen2-vl": VisionFamily(
        "qwen2-vl", 392, 196, 1536, img_start=_QWEN_START, img_end=_QWEN_END, img_content=_QWEN_PAD
    ),
    "qwen2.5-vl": VisionFamily(
        "qwen2.5-vl", 392, 196, 2048, img_start=_QWEN_START, img_end=_QWEN_END, img_content=_QWEN_PAD
    ),
    # several images in one prompt need runtime 1.3 (rknn-llm #468)
    "qwen3-vl": VisionFamily(
        "qwen3-vl",
        448,
        196,
        2048,
        4,
        img_start=_QWEN_START,
        img_end=_QWEN_END,
        img_content=_QWEN_PAD,
        multi_image_abi12=False,
    ),
    "internvl3": VisionFamily(
        "internvl3", 448, 256, 896, img_start="<img>", img_end="</img>", img_content="<IMG_CONTEXT>"
    ),
    "minicpm-v": VisionFamily(
        "minicpm-v", 448, 64, 3584, img_start="<image>", img_end="</image>\n", img_content="<unk>"
    ),
}


def family_key(family: str | None) -> str | None:
    """The :data:`FAMILIES` key a registry family belongs to, or None.

    A family is known when it is a key, or starts with one followed by a version or variant
    (``internvl3.5`` and ``minicpm-v-2-6`` belong to ``internvl3`` and ``minicpm-v``); the longest
    such key wins, so ``qwen2.5-vl`` is not taken for ``qwen2-vl``.
    """
    if not family:
        return None
    name = family.strip().lower()
    matches = [k for k in FAMILIES if name == k or (name.startswith(k) and name[len(k)] in ".-_0123456789")]
    return max(matches, key=len) if matches else None


def vision_family(family: str | None, overrides: dict[str, Any] | None = None, *, model: str = "") -> VisionFamily:
    """The vision facts of ``family``, with a registry file's ``vision`` overrides applied.

    Args:
        family: the model's family as the registry names it (``qwen3-vl``).
        overrides: fields to replace (``fill``, ``mean``, ``std``, tags, ...); with a complete set
            (``image_size``, ``tokens_per_image``, ``embed_width`` and the three tags) an unknown
            family is accepted.
        model: the model's name, for the error message.

    Raises:
        InvalidParameterError: the family is unknown and the overrides do not describe it fully, or an
            override names a field that does not exist or has a bad value.
    """
    extra = dict(overrides or {})
    allowed = {f.name for f in fields(VisionFamily)} - {"name"}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise InvalidParameterError(f"unknown vision setting(s) {unknown}; known: {sorted(allowed)}")
    for name in ("fill", "mean", "std"):
        if extra.get(name) is not None:
            extra[name] = tuple(extra[name])
    key = family_key(family)
    if key is not None:
        return replace(FAMILIES[key], **extra)
    needed = {"image_size", "tokens_per_image", "embed_width", "img_start", "img_end", "img_content"}
    if needed <= set(extra):
        return VisionFamily(name=family or "custom", **extra)
    raise InvalidParameterError(
        f"no vision facts are known for {model or family!r} (family {family or 'unknown'}); declare them in "
        f'rkllm-models.toml: [models."{model or family}"] vision = {{ image_size = 448, tokens_per_image = 196, '
        f'embed_width = 2048, img_start = "<|vision_start|>", img_end = "<|vision_end|>", '
        f'img_content = "<|image_pad|>" }} (add fill = [128, 128, 128], mean = [...], std = [...] for an '
        f"encoder that normalises on the host; known families: {', '.join(sorted(FAMILIES))})"
    )
