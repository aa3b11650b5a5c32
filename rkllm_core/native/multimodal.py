"""Multimodal run input in plain Python values: images' embeddings, their geometry and tags, checked.

A vision-language run sends the prompt with one ``<image>`` where each image belongs and the
images' embeddings (from the RKNN image encoder, see :mod:`rkllm_core.vision`) concatenated
image after image, as ``RKLLM_INPUT_MULTIMODAL``. Everything here is checked before any
native call; :class:`~rkllm_core.native.backend.Backend` writes the result into the ABI's
``RKLLMMultiModalInput`` (the tags: at init on 1.2, per run on 1.3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import ImageError, InvalidParameterError
from ..params import ImageTags

__all__ = [
    "IMAGE_TAG",
    "ImageInput",
    "MultimodalRequest",
    "check_image_count",
    "count_image_tags",
    "embedding_digest",
    "multimodal_request",
]

IMAGE_TAG = "<image>"
"""Where an image belongs in a multimodal prompt (one per image, in order)."""

_F32 = 4


class ImageInput(Protocol):
    """One image's embedding (what :class:`rkllm_core.vision.ImageEmbedding` is).

    Attributes:
        data: ``n_tokens × width`` float32 values, row-major, native byte order.
        n_tokens: image tokens.
        width: floats per token (the model's hidden size).
    """

    @property
    def data(self) -> bytes: ...  # noqa: D102
    @property
    def n_tokens(self) -> int: ...  # noqa: D102
    @property
    def width(self) -> int: ...  # noqa: D102


@dataclass(frozen=True, slots=True)
class MultimodalRequest:
    """The checked image part of a run.

    Attributes:
        embed: every image's embedding, concatenated image after image (float32 bytes).
        n_image: the number of images (= ``<image>`` tags in the prompt).
        n_image_tokens: tokens per image.
        width: floats per token.
        image_height: the encoder's input height (pixels).
        image_width: the encoder's input width (pixels).
        tags: (start, end, content) encoded, or ``None`` on 1.2 (set at init).
        digests: one SHA-256 hex digest per image (what a KV tag names).
    """

    embed: bytes
    n_image: int
    n_image_tokens: int
    width: int
    image_height: int
    image_width: int
    tags: tuple[bytes, bytes, bytes] | None
    digests: tuple[str, ...]


def count_image_tags(prompt: str) -> int:
    """How many ``<image>`` tags ``prompt`` holds."""
    return prompt.count(IMAGE_TAG)


def embedding_digest(image: ImageInput) -> str:
    """The SHA-256 hex digest of an image's embedding bytes (its identity when no digest is given)."""
    return hashlib.sha256(bytes(image.data)).hexdigest()


def check_image_count(abi: str, n_images: int, *, multi_image_abi12: bool = True, family: str = "") -> None:
    """Refuse several images in one prompt where the runtime or the family cannot take them.

    Qwen3-VL takes several images only on the 1.3 runtime (its family facts say
    ``multi_image_abi12=False``); the chat layer calls this with the family before it encodes.

    Args:
        abi: the runtime's ABI ("1.2" or "1.3").
        n_images: images in the prompt.
        multi_image_abi12: whether the family takes several images on 1.2.
        family: the family's name, for the message.

    Raises:
        ImageError: ``reason="multi-image"``: more than one image where that does not work.
    """
    if n_images > 1 and abi == "1.2" and not multi_image_abi12:
        name = family or "this model"
        raise ImageError(
            f"{name} takes one image per prompt on the RKLLM 1.2 runtime ({n_images} given); "
            "several images need runtime 1.3",
            reason="multi-image",
        )


def _geometry(images: Sequence[ImageInput]) -> tuple[int, int]:
    """(tokens, width) shared by every image; each image's size checked against them."""
    n_tokens, width = images[0].n_tokens, images[0].width
    for i, image in enumerate(images):
        if (image.n_tokens, image.width) != (n_tokens, width):
            raise ImageError(
                f"image {i} has {image.n_tokens}x{image.width} embeddings, image 0 {n_tokens}x{width}: "
                "every image of a run must come from the same encoder",
                reason="embedding-size",
            )
        if n_tokens <= 0 or width <= 0 or len(image.data) != n_tokens * width * _F32:
            raise ImageError(
                f"image {i}'s embedding is {len(image.data)} bytes, not {n_tokens} tokens x {width} float32 values",
                reason="embedding-size",
            )
    return n_tokens, width


def _size(image_size: tuple[int, int] | None) -> tuple[int, int]:
    if (
        image_size is None
        or len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        raise InvalidParameterError(f"image_size must be the encoder's (height, width) in pixels, got {image_size!r}")
    return image_size[0], image_size[1]


def multimodal_request(
    prompt: str,
    images: Sequence[ImageInput],
    *,
    image_size: tuple[int, int] | None,
    tags: ImageTags | None,
    digests: Sequence[str] | None = None,
) -> MultimodalRequest:
    """Check a run's images against its prompt and put them in a :class:`MultimodalRequest`.

    Args:
        prompt: the text, with one ``<image>`` per image.
        images: the images' embeddings, in prompt order.
        image_size: the encoder's input (height, width).
        tags: the tags to send with the run (``None``: set at init, the 1.2 ABI).
        digests: one digest per image (e.g. of the image file); default: SHA-256 of each embedding.

    Raises:
        ImageError: the ``<image>`` count differs from the images (``reason="image-count"``), or an
            embedding has the wrong size (``reason="embedding-size"``).
        InvalidParameterError: a bad ``image_size`` or digest list.
    """
    n_tags = count_image_tags(prompt)
    if n_tags != len(images):
        raise ImageError(
            f"the prompt has {n_tags} {IMAGE_TAG} tag(s) but {len(images)} image(s) were given; "
            f"put one {IMAGE_TAG} where each image belongs",
            reason="image-count",
        )
    n_tokens, width = _geometry(images)
    height, img_width = _size(image_size)
    if digests is not None and (len(digests) != len(images) or not all(isinstance(d, str) for d in digests)):
        raise InvalidParameterError(f"image_digests must hold one str per image ({len(images)})")
    return MultimodalRequest(
        embed=b"".join(bytes(image.data) for image in images),
        n_image=len(images),
        n_image_tokens=n_tokens,
        width=width,
        image_height=height,
        image_width=img_width,
        tags=None if tags is None else (tags.start.encode(), tags.end.encode(), tags.content.encode()),
        digests=tuple(digests) if digests is not None else tuple(embedding_digest(i) for i in images),
    )
