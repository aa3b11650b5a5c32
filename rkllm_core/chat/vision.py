"""Images in chat requests: which models take them, their bytes, and their embeddings.

A request with images is checked before its model loads: the model must be a ``vision`` model
with an image encoder and a known family (:func:`~rkllm_core.vision.families.vision_family`),
the images must fit its context, and every image must be readable and decodable (an
``http(s)`` URL only with :attr:`ChatOptions.allow_remote_images
<rkllm_core.chat.options.ChatOptions>`). Once the model and its encoder are leased, each
distinct image is encoded at most once per process while it stays in a bounded cache
(:func:`image_cache`, content hash → embedding), so a conversation that is sent again with
its history does not run the encoder again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ContextLengthError, InvalidParameterError, ModelKindError
from ..models.registry import ModelInfo
from ..params import ImageTags
from .messages import ChatMessage, ImagePart
from .options import ChatOptions

if TYPE_CHECKING:
    from ..vision.cache import EmbeddingCache
    from ..vision.encoder import ImageEmbedding, ImageEncoder
    from ..vision.families import VisionFamily

__all__ = ["VisionRequest", "image_cache", "vision_request"]

_CACHE: list[EmbeddingCache] = []


def image_cache() -> EmbeddingCache:
    """The process-wide cache of encoded images (64 MiB, least recently used evicted)."""
    if not _CACHE:
        from ..vision.cache import EmbeddingCache

        _CACHE.append(EmbeddingCache())
    return _CACHE[0]


def _family(info: ModelInfo) -> VisionFamily:
    from ..vision.families import vision_family

    return vision_family(info.vision_family, info.defaults.vision_overrides, model=info.name)


@dataclass
class VisionRequest:
    """The images of one request, read and checked before the model loads.

    Attributes:
        family: the model's vision facts.
        tags: the family's image tags.
        digests: each image's content digest (SHA-256 hex), by :meth:`ImagePart.key`.
        source: what identifies the encoder and its preprocessing in the cache keys.
    """

    family: VisionFamily
    tags: ImageTags
    digests: dict[str, str]
    source: tuple[Any, ...]
    _decoded: dict[str, Any] = field(default_factory=dict)
    _data: dict[str, bytes] = field(default_factory=dict)

    def embeddings(self, images: Sequence[ImagePart], encoder: ImageEncoder) -> list[ImageEmbedding]:
        """The embeddings of ``images`` in order: from the cache, else encoded (and cached)."""
        from ..vision.cache import image_key

        cache = image_cache()
        out = []
        for image in images:
            key = image_key(self.digests[image.key()], self.source)
            out.append(cache.get_or_encode(key, functools.partial(self._encode, image, encoder)))
        return out

    def _encode(self, image: ImagePart, encoder: ImageEncoder) -> ImageEmbedding:
        from ..vision.preprocess import decode_image, to_tensor

        key = image.key()
        decoded = self._decoded.pop(key, None)
        if decoded is None:  # evicted from the cache since the request was checked
            decoded = decode_image(self._data[key], min_side=max(encoder.geometry.height, encoder.geometry.width))
        return encoder.encode(to_tensor(decoded, encoder.pixel_spec))


def vision_request(info: ModelInfo, msgs: Sequence[ChatMessage], opts: ChatOptions) -> VisionRequest | None:
    """Check a request's images against its model and read them; None for a request without images.

    Raises:
        ModelKindError: images for a model that is not a vision model, or one without an image encoder.
        InvalidParameterError: the model's vision family is unknown (the message says what to declare),
            or it is loaded batched (``n_batch`` > 1).
        ContextLengthError: the images alone do not fit the model's context.
        ImageError: an image cannot be read or decoded (or is a URL that may not be fetched).
    """
    parts = [image for m in msgs for image in m.images]
    if not parts:
        return None
    _check_model(info, len(parts))
    family = _family(info)
    if len(parts) * family.tokens_per_image >= info.context_size:
        raise ContextLengthError(
            f"{len(parts)} images of {family.tokens_per_image} tokens do not fit the {info.context_size}-token "
            f"context of {info.name}; send fewer images",
            requested=len(parts) * family.tokens_per_image,
            limit=info.context_size,
        )
    req = VisionRequest(
        family, ImageTags(family.img_start, family.img_end, family.img_content), {}, (str(info.encoder), family)
    )
    _read(req, parts, opts)
    return req


def _check_model(info: ModelInfo, n_images: int) -> None:
    if info.kind != "vision":
        raise ModelKindError(
            f"{info.name} is a {info.kind} model and takes no images ({n_images} given); "
            "send them to a vision-language model (kind 'vision')"
        )
    if info.encoder is None:
        raise ModelKindError(
            f"{info.name} is a vision model without an image encoder, so it serves text only: put its .rknn "
            "encoder beside it, or name it with vision_encoder in rkllm-models.toml"
        )
    if (info.defaults.n_batch or 1) > 1:
        raise InvalidParameterError(
            f"{info.name} is loaded batched (n_batch {info.defaults.n_batch}); batched runs take no images yet: "
            "load it with n_batch = 1 to send images"
        )


def _read(req: VisionRequest, parts: Sequence[ImagePart], opts: ChatOptions) -> None:
    """Read every distinct image, and decode those the cache does not hold (errors before any load)."""
    from ..vision.cache import image_digest, image_key
    from ..vision.preprocess import decode_image, image_bytes

    cache = image_cache()
    for part in parts:
        key = part.key()
        if key in req.digests:
            continue
        source = part.data if part.data is not None else part.url
        assert source is not None
        data = image_bytes(source, allow_remote=opts.allow_remote_images)
        digest = image_digest(data)
        req.digests[key] = digest
        req._data[key] = data
        if image_key(digest, req.source) not in cache:
            side = req.family.image_size
            req._decoded[key] = decode_image(data, min_side=side)
