"""The ``.rkllm`` file-name grammar: what a file name says, and the friendly name it gives.

A model's file name usually carries its family, size, quantisation, target SoC
and conversion settings, in one of several naming styles. :func:`parse_model_filename`
reads them into :class:`ModelFacts`; :func:`friendly_name` turns those into the
short name a model is looked up by, e.g.
``Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm`` is
``qwen3-0.6b``. When several files share a friendly name, :func:`_disambiguate`
gives each a visible suffix from the facts that tell them apart
(``qwen3-0.6b-w8a8`` / ``qwen3-0.6b-w4a16``).

Everything here works on names alone: nothing is read from disk. Finding the
files and looking them up is :mod:`rkllm_core.models.registry`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .board import PLATFORM_RE

__all__ = [
    "ModelFacts",
    "friendly_name",
    "parse_model_filename",
]

_SUFFIX = ".rkllm"


# --------------------------------------------------------------------------
# File name parsing
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a model's file name says about it.

    Attributes:
        family: model family with its version, lower case (``qwen3``,
            ``gemma3``, ``deepseek-r1-distill-qwen``); None when the name has
            no recognisable family (``language_model_w8a8.rkllm``).
        size: parameter count as written, lower case (``0.6b``, ``270m``, ``e2b``).
        variant: what the model was tuned for, ``-``-joined: a kind (``vl``,
            ``ocr``, ``coder``, ``math``, ``embedding``, ``decoder``) then a
            tuning (``instruct``, ``it``, ``chat``, ``base``, ``thinking``, ...).
        dtype: quantisation, lower case (``w8a8``, ``w4a16_g128``).
        opt: optimisation level (``opt-1``, ``opt0``, ``level1``, ``o0``).
        hybrid: hybrid quantisation ratio (``hybrid-ratio-0.5``, ``hybrid1``).
        npu_cores: NPU cores the model was converted for (``npu3``).
        ctx: context limit baked at conversion, in tokens (``ctx16384``,
            ``ctx-4096``, ``16k``; 1k = 1024).
        platform: target SoC, lower case (``rk3588``, ``rk3576``, ``rv1126b``).
        label: the file's own name words without the quantisation and platform
            details, ``-``-joined; :func:`friendly_name` uses it when there is
            no family.
    """

    family: str | None = None
    size: str | None = None
    variant: str | None = None
    dtype: str | None = None
    opt: int | None = None
    hybrid: float | None = None
    npu_cores: int | None = None
    ctx: int | None = None
    platform: str | None = None
    label: str = ""


# Organisation prefixes that stand before an ``_`` when a Hugging Face repo id
# ``org/name`` became a file name (``Qwen_Qwen3-0.6B``, ``google_gemma-3-270m``).
_KNOWN_ORGS: Final = frozenset(
    {
        "01-ai", "allenai", "baichuan-inc", "bartowski", "deepseek-ai", "google",
        "huggingfacetb", "ibm-granite", "internlm", "llm-jp", "meta-llama",
        "microsoft", "mistralai", "nvidia", "openbmb", "opengvlab", "qwen",
        "stabilityai", "thudm", "tiiuae", "unsloth", "zai-org",
    }
)  # fmt: skip
# First words of families, to tell a family without digits or size
# (``LLaMA-Mesh``) from a project's nickname (``xiaoji_3576``).
_KNOWN_FAMILY_PREFIXES: Final = (
    "baichuan", "chatglm", "codegemma", "deepseek", "exaone", "falcon", "gemma",
    "glm", "granite", "internlm", "internvl", "janus", "llama", "llava", "marco",
    "minicpm", "mistral", "mixtral", "nemotron", "olmo", "phi", "qwen", "smollm",
    "smolvlm", "stablelm", "starcoder", "telechat", "tinyllama", "yi",
)  # fmt: skip
# Bare SoC numbers seen instead of a platform (``xiaoji_3576``).
_BARE_SOCS: Final = frozenset({"3562", "3566", "3568", "3576", "3588"})
_TUNING_WORDS: Final = frozenset({"instruct", "it", "chat", "base", "thinking", "rag", "abliterated"})
# Kinds that leave the family when they follow a versioned name
# (``Qwen2.5-Coder-14B`` is qwen2.5, kind coder; ``deepseek-coder`` keeps it).
_KIND_WORDS: Final = frozenset({"coder", "math", "embedding"})
_KIND_ORDER: Final = ("vl", "ocr", "coder", "math", "embedding", "decoder")
# Words that never belong to a family: ``-hf`` repo suffixes and Phi's size
# class (the data gives Phi-3-mini as family phi3, size unknown).
_DROP_WORDS: Final = frozenset({"hf", "mini"})

_SEP_RE: Final = re.compile(r"([-_\s]+|\.(?!\d)|(?<!\d)\.)")
_ORG_RE: Final = re.compile(r"^([A-Za-z0-9][A-Za-z0-9.-]*)_(.+)$")
_SIZE_RE: Final = re.compile(r"^(?:\d+(?:\.\d+)?[bm]|e\d+(?:\.\d+)?b|\d+x\d+(?:\.\d+)?b)$")
_DTYPE_RE: Final = re.compile(r"^(?:w\d+(?:a\d+)?|fp16|bf16|f16)$")
_GROUP_RE: Final = re.compile(r"^g\d+$")
_KTOKEN_RE: Final = re.compile(r"^(\d+)k$")
_INT_RE: Final = re.compile(r"^\d+$")
_NUMBER_RE: Final = re.compile(r"^\d+(?:\.\d+)?$")
_OPT_RE: Final = re.compile(r"^(?:opt|level)(\d+)$")
_SHORT_OPT_RE: Final = re.compile(r"^o(\d)$")
_HYBRID_RE: Final = re.compile(r"^hybrid(\d+(?:\.\d+)?)$")
_NPU_RE: Final = re.compile(r"^npu(\d+)$")
_CTX_RE: Final = re.compile(r"^ctx(\d+)(k?)$")
_VERSION_RE: Final = re.compile(r"^(?:v?\d+(?:\.\d+){2,}|rkllm[\d.]*)$")
_VISION_RE: Final = re.compile(r"(?:^|-)vl(?:-|$)|vlm|internvl|minicpm-v|llava")
# Glued or abbreviated family spellings, applied to the ``-``-joined family.
_FAMILY_FIXES: Final = (
    (re.compile(r"^ds-"), "deepseek-"),  # ds_r1_qwen_7b
    (re.compile(r"^deepseekocr\b"), "deepseek-ocr"),
    (re.compile(r"^minicpmv(\d)"), r"minicpm-v\1"),  # MiniCPMV4
    # R1 on a Qwen or Llama base is always one of the distilled models.
    (re.compile(r"^deepseek-r1-(qwen|llama)"), r"deepseek-r1-distill-\1"),
)


def _strip_suffix(filename: str) -> str:
    name = Path(filename).name
    return name[: -len(_SUFFIX)] if name.lower().endswith(_SUFFIX) else name


def _tokenise(stem: str) -> list[str]:
    """Split a file stem into lower-case words, keeping ``2.5`` and ``0.6b`` whole.

    A ``.`` separates words unless it stands between two digits. Underscores
    that stand for a decimal point are put back: ``internlm2_5`` is
    ``internlm2.5`` and ``1_8b`` is ``1.8b``.
    """
    parts = _SEP_RE.split(stem.lower())
    tokens: list[str] = []
    sep = ""
    for index, part in enumerate(parts):
        if index % 2:
            sep = part
            continue
        if not part:
            continue
        if tokens and sep == "_":
            left = tokens[-1]
            if (re.fullmatch(r"[a-z]+\d+", left) and re.fullmatch(r"\d", part)) or (
                re.fullmatch(r"\d{1,2}", left) and re.fullmatch(r"\d+[bm]", part)
            ):
                tokens[-1] = f"{left}.{part}"
                continue
        tokens.append(part)
    return tokens


def _strip_org(stem: str) -> str:
    match = _ORG_RE.match(stem)
    if match is None:
        return stem
    org, rest = match.group(1).lower(), match.group(2)
    if not (org in _KNOWN_ORGS or (len(org) >= 3 and rest.lower().startswith(org))):
        return stem
    # "qwen_7b" and "qwen_chat_7b" are a model's own name, not "org_name".
    first = next(iter(_tokenise(rest)), "")
    if not first[:1].isalpha() or first in _TUNING_WORDS or _ends_name(first):
        return stem
    return rest


def _ends_name(token: str) -> bool:
    """Whether ``token`` is file metadata, which ends the model's name words."""
    return bool(
        _SIZE_RE.match(token)
        or PLATFORM_RE.match(token)
        or token in _BARE_SOCS
        or _DTYPE_RE.match(token)
        or token in ("opt", "hybrid", "npu", "ctx")
        or _OPT_RE.match(token)
        or _HYBRID_RE.match(token)
        or _NPU_RE.match(token)
        or _CTX_RE.match(token)
        or _VERSION_RE.match(token)
    )


def _ctx_value(digits: str, kilo: bool) -> int:
    return int(digits) * 1024 if kilo else int(digits)


def _family_of(words: list[str], has_size: bool) -> tuple[str | None, list[str], list[str]]:
    """Build the family from the name words.

    Returns:
        The family (or None), the kinds and the tunings found among the words.
    """
    kinds: list[str] = []
    tunings: list[str] = []
    kept: list[str] = []
    for word in words:
        if word in _TUNING_WORDS:
            tunings.append(word)
        elif word == "decoder":
            kinds.append(word)
        elif word in _KIND_WORDS and any(ch.isdigit() for w in kept for ch in w):
            kinds.append(word)
        elif word not in _DROP_WORDS:
            kept.append(word)
    if len(kept) >= 2 and kept[0] == "meta" and kept[1].startswith("llama"):
        kept = kept[1:]
    # The version goes onto the first word only: Llama-3.2 -> llama3.2 but
    # llm-jp-3 stays llm-jp-3 and DeepSeek-R1-0528 stays deepseek-r1-0528.
    if len(kept) >= 2 and kept[0].isalpha() and _NUMBER_RE.match(kept[1]):
        kept[:2] = [kept[0] + kept[1]]
    if not kept:
        return None, kinds, tunings
    family = "-".join(kept)
    for pattern, repl in _FAMILY_FIXES:
        family = pattern.sub(repl, family)
    if not has_size and not any(ch.isdigit() for ch in family) and not family.startswith(_KNOWN_FAMILY_PREFIXES):
        # "xiaoji", "language-model", "talker-fullvocab-fixed": a project's own
        # name for a file, not a model family.
        return None, kinds, tunings
    if _VISION_RE.search(family):
        kinds.insert(0, "vl")
        if family.endswith("-llm"):  # qwen2-vl-llm: the LLM half of a VL model
            family = family[: -len("-llm")]
    if "ocr" in family:
        kinds.append("ocr")
    if any("code" in word and not word.endswith(("decoder", "encoder")) for word in words):
        kinds.append("coder")
    return family, kinds, tunings


def parse_model_filename(filename: str) -> ModelFacts:
    """Read the facts a ``.rkllm`` file name carries.

    Handles the naming styles seen in the wild: the vendor toolkit's
    ``Qwen3-1.7B-rk3588-w8a8_g128-opt-0-hybrid-ratio-0.5``, the
    ``Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588`` style with an
    organisation prefix, underscore styles (``qwen3_0.6b_w4a16_g64_rk3562``,
    ``internlm2_5-1_8b-chat``), ``16k`` context tokens and bare SoC numbers.
    Nothing is read from disk.

    Args:
        filename: a file name or path; a ``.rkllm`` suffix is optional.

    Returns:
        The facts; a fact the name does not carry is None.
    """
    stem = _strip_suffix(filename)
    tokens = _tokenise(_strip_org(stem))

    cut = len(tokens)
    for index, token in enumerate(tokens):
        if _ends_name(token):
            cut = index
            break
    name_words, rest = tokens[:cut], tokens[cut:]

    size: str | None = None
    ctx: int | None = None
    words: list[str] = []
    for index, word in enumerate(name_words):
        kilo = _KTOKEN_RE.match(word)
        if kilo is None:
            words.append(word)
        elif index + 1 == len(name_words):
            # "qwen3-16k-w8a8": a context token right before the metadata. One
            # followed by more name words is the model's own ("Phi-3-mini-128k-instruct").
            ctx = _ctx_value(kilo.group(1), True)

    dtype: str | None = None
    opt: int | None = None
    hybrid: float | None = None
    npu: int | None = None
    platform: str | None = None
    explicit_ctx = False
    extra_kinds: list[str] = []
    extra_tunings: list[str] = []
    index = 0
    while index < len(rest):
        token = rest[index]
        following = rest[index + 1] if index + 1 < len(rest) else ""
        index += 1
        if size is None and _SIZE_RE.match(token):
            size = token
        elif PLATFORM_RE.match(token):
            platform = platform or token
        elif token in _BARE_SOCS:
            platform = platform or f"rk{token}"
        elif _DTYPE_RE.match(token):
            if _GROUP_RE.match(following):
                token = f"{token}_{following}"
                index += 1
            dtype = dtype or token
        elif match := (_OPT_RE.match(token) or _SHORT_OPT_RE.match(token)):
            opt = int(match.group(1))
        elif token == "opt" and _INT_RE.match(following):
            opt = int(following)
            index += 1
        elif match := _HYBRID_RE.match(token):
            hybrid = float(match.group(1))
        elif token == "hybrid":
            if following == "ratio":
                index += 1
                following = rest[index] if index < len(rest) else ""
            if _NUMBER_RE.match(following):
                hybrid = float(following)
                index += 1
        elif match := _NPU_RE.match(token):
            npu = int(match.group(1))
        elif token == "npu" and _INT_RE.match(following):
            npu = int(following)
            index += 1
        elif match := _CTX_RE.match(token):
            ctx, explicit_ctx = _ctx_value(match.group(1), bool(match.group(2))), True
        elif token == "ctx" and (_INT_RE.match(following) or _KTOKEN_RE.match(following)):
            ctx, explicit_ctx = _ctx_value(following.rstrip("k"), following.endswith("k")), True
            index += 1
        elif (match := _KTOKEN_RE.match(token)) and not explicit_ctx:
            ctx = _ctx_value(match.group(1), True)
        elif token in _TUNING_WORDS:
            extra_tunings.append(token)
        elif token in _KIND_WORDS or token == "decoder":
            extra_kinds.append(token)
        # Anything else (toolkit versions, release dates, "llm", "hf") says nothing.

    family, kinds, tunings = _family_of(words, size is not None)
    ordered_kinds = [kind for kind in _KIND_ORDER if kind in kinds or kind in extra_kinds]
    all_tunings = list(dict.fromkeys(tunings + extra_tunings))
    variant = "-".join(ordered_kinds + all_tunings) or None
    label = "-".join(words) or "-".join(t for t in tokens if t != size) or "model"
    return ModelFacts(
        family=family,
        size=size,
        variant=variant,
        dtype=dtype,
        opt=opt,
        hybrid=hybrid,
        npu_cores=npu,
        ctx=ctx,
        platform=platform,
        label=label,
    )


def friendly_name(facts: ModelFacts) -> str:
    """The short lower-case name of a model: family (with version) and size.

    ``qwen3-0.6b``, ``gemma3-270m``, ``deepseek-r1-distill-qwen-7b``; the
    family alone when the size is unknown; the file's own name words
    (``facts.label``) when the family is unknown.

    Args:
        facts: facts from :func:`parse_model_filename`.

    Returns:
        The friendly name, before any disambiguation.
    """
    base = facts.family or facts.label
    name = f"{base}-{facts.size}" if facts.size else base
    return re.sub(r"\s+", "-", name.strip().lower())


# --------------------------------------------------------------------------
# Disambiguation
# --------------------------------------------------------------------------


def _ctx_suffix(ctx: int) -> str:
    return f"ctx{ctx // 1024}k" if ctx % 1024 == 0 else f"ctx{ctx}"


def _disambiguate(base: str, group: Sequence[ModelFacts]) -> list[str]:
    """Give each member of a group sharing ``base`` a distinct visible suffix.

    The suffix is the smallest combination of variant, dtype, platform and
    context (tried in that order) that tells all members apart; failing that,
    a 1-based index in the group's order (the registry sorts each group by path).
    """
    per_kind: list[list[str | None]] = [
        [facts.variant for facts in group],
        [facts.dtype for facts in group],
        [facts.platform for facts in group],
        [_ctx_suffix(facts.ctx) if facts.ctx else None for facts in group],
    ]
    for width in range(1, len(per_kind) + 1):
        for combo in itertools.combinations(per_kind, width):
            suffixes = ["-".join(v for v in values if v) for values in zip(*combo, strict=True)]
            if all(suffixes) and len(set(suffixes)) == len(suffixes):
                return [f"{base}-{suffix}" for suffix in suffixes]
    return [f"{base}-{index}" for index in range(1, len(group) + 1)]
