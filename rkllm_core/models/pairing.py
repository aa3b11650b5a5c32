"""Pairing ``.rknn`` image encoders with the ``.rkllm`` language models beside them.

A vision-language model ships as two files in one folder: the language model (``.rkllm``) and its
image encoder (``.rknn``). :func:`pick_encoder` decides which encoder of a folder belongs to a
model, by these rules (the registry applies them; a registry file's ``vision_encoder`` overrides
them):

1. **Model words.** An encoder whose file name gives the same family and size as the model's
   (and the same SoC when both name one) belongs to it, whatever else the names say:
   ``qwen3-vl-2b-instruct_w8a8_rk3588.rkllm`` + ``qwen3-vl-2b_vision_rk3588.rknn``,
   ``qwen2.5-vl-3b-w8a8_level1_rk3588.rkllm`` + ``qwen2_5_vl_3b_vision_rk3588.rknn``. Only a
   model that is a ``vision`` model (by its name or its registry ``kind``) is paired this way.
2. **The only pair in a folder.** One ``.rkllm`` and one ``.rknn`` in a folder belong together
   when the names carry nothing to contradict it: the model is a ``vision`` model or its name
   gives no family, and the encoder's name gives no family or the model's
   (happyme531's ``language_model_w8a8.rkllm`` + ``vision_encoder.rknn``).
3. **Several encoders for one model** (``qwen3-vl-2b_vision_{448,672,896}_rk3588.rknn``): the one
   whose name gives no input size is taken (the publisher's default), else the smallest input
   size (448: the fewest image tokens, the fastest encoder), then by file name.

A model whose registry ``kind`` is not ``vision`` (``chat``, ``embedding``, ``reranker``) gets
no encoder by these rules; a text model's name never matches an encoder's words.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..filenames import ModelFacts, ModelKind, parse_model_filename

__all__ = ["ENCODER_SUFFIX", "EncoderFile", "input_size_in_name", "list_encoders", "pick_encoder"]

#: The file name suffix of an RKNN image encoder.
ENCODER_SUFFIX: Final = ".rknn"

# An input size written alone between separators: ``_672_`` (rk3588, w8a8 and the like are not alone).
_SIZE_WORD: Final = re.compile(r"(?:^|[-_.])(\d{3,4})(?=[-_.]|$)")


@dataclass(frozen=True, slots=True)
class EncoderFile:
    """One ``.rknn`` file in a model folder.

    Attributes:
        path: the resolved path.
        filename: the directory entry's name.
        size: the file's size in bytes.
        facts: what its name says (family, size, SoC), read as a model name is.
    """

    path: Path
    filename: str
    size: int
    facts: ModelFacts


def list_encoders(folder: Path) -> list[EncoderFile]:
    """The ``.rknn`` files directly in ``folder`` (hidden ones skipped), by name; empty when unreadable."""
    found: list[EncoderFile] = []
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.lower().endswith(ENCODER_SUFFIX):
            continue
        try:
            if not entry.is_file():
                continue
            path = Path(entry.path).resolve()
            size = path.stat().st_size
        except OSError:
            continue
        stem = entry.name[: -len(ENCODER_SUFFIX)]
        found.append(EncoderFile(path, entry.name, size, parse_model_filename(stem)))
    return found


def input_size_in_name(filename: str) -> int | None:
    """The input size an encoder's name gives (``qwen3-vl-2b_vision_672_rk3588.rknn``: 672), or None."""
    stem = filename[: -len(ENCODER_SUFFIX)] if filename.lower().endswith(ENCODER_SUFFIX) else filename
    sizes = [int(m) for m in _SIZE_WORD.findall(stem.lower()) if 112 <= int(m) <= 4096]
    return sizes[0] if sizes else None


def _same_soc(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a.lower() == b.lower()


def _words_match(model: ModelFacts, encoder: ModelFacts) -> bool:
    return (
        model.family is not None
        and encoder.family == model.family
        and encoder.size == model.size
        and _same_soc(model.platform, encoder.platform)
    )


def _preference(encoder: EncoderFile) -> tuple[int, str]:
    return input_size_in_name(encoder.filename) or 0, encoder.filename


def pick_encoder(
    facts: ModelFacts, kind: ModelKind | None, encoders: list[EncoderFile], models_in_folder: int
) -> EncoderFile | None:
    """The encoder of ``encoders`` (one folder's) that belongs to a model, by the module's rules.

    Args:
        facts: what the model's file name says.
        kind: the model's ``kind`` from its registry file, if set.
        encoders: the ``.rknn`` files in the model's folder.
        models_in_folder: how many ``.rkllm`` files that folder holds.

    Returns:
        The encoder, or None.
    """
    if kind not in (None, "vision") or not encoders:
        return None
    is_vision = (kind or facts.kind) == "vision"
    if is_vision:
        matching = [e for e in encoders if _words_match(facts, e.facts)]
        if matching:
            return min(matching, key=_preference)
    if models_in_folder != 1 or len(encoders) != 1:
        return None
    only = encoders[0]
    if not (is_vision or facts.family is None) or only.facts.family not in (None, facts.family):
        return None
    if not _same_soc(facts.platform, only.facts.platform):
        return None
    return only
