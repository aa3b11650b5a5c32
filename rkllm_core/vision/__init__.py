"""Images for vision-language models: the RKNN image encoder, preprocessing, and a cache of encoded images.

- :mod:`.encoder`: :class:`ImageEncoder`, one loaded ``.rknn`` encoder (geometry from its attributes,
  outputs interleaved per token, one run at a time).
- :mod:`.preprocess`: from bytes, a path or a URL to the encoder's input tensor (Pillow, the ``vision``
  extra, imported on first use).
- :mod:`.families`: image tags, pad colour and normalisation per vision-language family.
- :mod:`.cache`: :class:`EmbeddingCache`, encoded images by content hash, LRU by bytes.

Importing this package loads neither ``librknnrt.so`` nor Pillow.
"""

from .cache import EmbeddingCache, image_digest, image_key
from .encoder import EncoderGeometry, ImageEmbedding, ImageEncoder, SDKVersion, core_mask_for
from .families import FAMILIES, VisionFamily, vision_family
from .preprocess import PixelSpec, decode_image, fetch_image_url, image_bytes, preprocess, to_tensor

__all__ = [
    "FAMILIES",
    "EmbeddingCache",
    "EncoderGeometry",
    "ImageEmbedding",
    "ImageEncoder",
    "PixelSpec",
    "SDKVersion",
    "VisionFamily",
    "core_mask_for",
    "decode_image",
    "fetch_image_url",
    "image_bytes",
    "image_digest",
    "image_key",
    "preprocess",
    "to_tensor",
    "vision_family",
]
