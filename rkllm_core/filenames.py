"""The ``.rkllm`` file-name grammar: what a file name says, and the friendly name it gives.

A model's file name usually carries its family, size, quantisation, target SoC
and conversion settings, in one of several naming styles. :func:`parse_model_filename`
reads them into :class:`ModelFacts`; :func:`friendly_name` turns those into the
short name a model is looked up by.

Friendly names (the *base name* of a model)::

    <family>[-<kind words>][-<size>][-<qualifiers>]

* ``family``: the family with its version (``qwen3``, ``gemma3``,
  ``deepseek-r1-distill-qwen``), or the file's own name words when there is no
  recognisable family (``xiaoji``);
* kind words taken out of the family: ``coder``, ``math``, ``embedding``,
  ``reranker``, ``decoder`` (``qwen2.5-coder-1.5b``, ``qwen3-embedding-0.6b``);
  kinds that are part of the family's own name stay there (``qwen2.5-vl-3b``,
  ``deepseek-coder-1.3b``, ``internvl3-1b``);
* the size as written (``0.6b``, ``270m``, ``e2b``);
* qualifiers that tell the model from its base model, in file order: date tags
  (``qwen3-4b-2507``), model versions (``deepseek-coder-7b-v1.5``), the
  active size of a mixture of experts (``qwen3-30b-a3b``), fine-tune
  and tuning words other than ``instruct``/``it``/``chat``
  (``qwen3-4b-thinking-2507``, ``qwen2.5-3b-abliterated``, ``vi-qwen2-3b-rag``)
  and the model's own size class or context words (``phi3-mini-128k``).

``instruct``, ``it`` and ``chat`` are dropped (nearly every chat model has one),
as is everything about the conversion: quantisation, platform, optimisation
level, hybrid ratio, NPU cores, context and runtime version. So
``Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm`` is
``qwen3-0.6b`` and ``gemma-3-1b-it_w8a8.rkllm`` is ``gemma3-1b``.

When several files share a base name, :func:`_disambiguate` gives each a
suffix made of the conversion facts that tell them apart: the smallest set of
them that separates the group, the first such set in the order dtype (with
its group size), platform, context, optimisation level, hybrid ratio, NPU
cores, runtime version, ``instruct``/``it``/``chat`` (``qwen3-0.6b-w8a8`` /
``qwen3-0.6b-w4a16_g64``; ``llama-mesh-w8a8_g512-opt0``). A member that states
none of the chosen facts gets ``plain``. Only files that agree in every one of
those facts get a counter (``qwen3-0.6b-1``, ``qwen3-0.6b-2``, in path order).
A group's names depend on that group's files alone, and adding a file keeps
its siblings' names unless they no longer tell it apart.

Every model also has a *kind* (:data:`ModelKind`): ``embedding`` or
``reranker`` when its name says so, ``vision`` for the language half of a
vision-language model (``vl``, ``vlm``, ``vision``, ``omni``, ``ocr``,
InternVL, MiniCPM-V, LLaVA, Janus, ...), else ``chat``.

Everything here works on names alone: nothing is read from disk. Finding the
files and looking them up is :mod:`rkllm_core.models.registry`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from .board import PLATFORM_RE

__all__ = [
    "MODEL_KINDS",
    "ModelFacts",
    "ModelKind",
    "friendly_name",
    "parse_model_filename",
]

_SUFFIX = ".rkllm"

#: What a model is for: ``chat`` (text in, text out), ``embedding`` (text in,
#: vectors out), ``reranker`` (query and document in, a score out) or
#: ``vision`` (the language half of a vision-language model, which needs an
#: image encoder in front of it).
ModelKind = Literal["chat", "embedding", "reranker", "vision"]
#: Every :data:`ModelKind`, in that order.
MODEL_KINDS: Final[tuple[ModelKind, ...]] = ("chat", "embedding", "reranker", "vision")


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
        runtime: the RKLLM runtime or toolkit version the name gives
            (``1.2.0`` from ``Qwen3-4B-1.2.0``, ``1.1.4`` from ``rkllm1.1.4``).
        tags: the words that tell the model from its base model and that the
            family does not hold, in file order: kind words taken out of the
            family (``coder``, ``math``, ``embedding``, ``reranker``,
            ``decoder``), date tags (``2507``), model versions (``v1.5``),
            tuning and fine-tune words other than ``instruct``, ``it`` and
            ``chat`` (``thinking``, ``base``, ``abliterated``, ``rag``) and the
            model's own size class or context words (``mini``, ``128k``).
        kind: what the model is for, from its name (see :data:`ModelKind`).
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
    runtime: str | None = None
    tags: tuple[str, ...] = ()
    kind: ModelKind = "chat"


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
# Tunings nearly every chat model has: they are facts (``variant``) but not part
# of the friendly name.
_GENERIC_TUNINGS: Final = frozenset({"instruct", "it", "chat"})
# Kinds that leave the family when they follow a versioned name
# (``Qwen2.5-Coder-14B`` is qwen2.5, kind coder; ``deepseek-coder`` keeps it).
_KIND_WORDS: Final = frozenset({"coder", "math", "embedding", "reranker"})
_KIND_ORDER: Final = ("vl", "ocr", "coder", "math", "embedding", "reranker", "decoder")
# Words that never belong to a family: ``-hf`` repo suffixes.
_DROP_WORDS: Final = frozenset({"hf"})
# Size classes written instead of a parameter count: a tag, not part of the
# family (the data gives Phi-3-mini as family phi3, size unknown).
_SIZE_CLASS_WORDS: Final = frozenset({"mini"})
# Words after the size that say nothing about the model: the LLM half of a
# multimodal export (``smolvlm_256m_llm``), repo suffixes, and the suffix word
# :func:`_disambiguate` uses for a file that states none of the chosen facts.
_NOISE_WORDS: Final = frozenset({"llm", "hf", "model", "rkllm", "ratio", "plain"})
_EMBEDDING_WORDS: Final = frozenset({"embed", "embedding", "embeddings"})
_RERANKER_WORDS: Final = frozenset({"rerank", "reranker"})
# Words of vision-language models whose names do not say "vl".
_VISION_WORDS: Final = frozenset({"vision", "omni", "janus", "moondream", "paligemma"})

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
_DATE_TAG_RE: Final = re.compile(r"^(?:\d{4}|\d{6}|\d{8})$")  # 2507, 0528, 20250715
_MODEL_VERSION_RE: Final = re.compile(r"^v\d+(?:\.\d+)?$")  # deepseek-coder-7b-instruct-v1.5
_ACTIVE_SIZE_RE: Final = re.compile(r"^a\d+(?:\.\d+)?b$")  # the active parameters of a MoE: Qwen3-30B-A3B
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


def _family_of(words: list[str], has_size: bool) -> tuple[str | None, list[str], list[str], list[str]]:
    """Build the family from the name words.

    Returns:
        The family (or None), and the kinds, the tunings and the tags (see
        :attr:`ModelFacts.tags`) found among the words.
    """
    kinds: list[str] = []
    tunings: list[str] = []
    tags: list[str] = []
    kept: list[str] = []
    for word in words:
        if word in _TUNING_WORDS:
            tunings.append(word)
            if word not in _GENERIC_TUNINGS:
                tags.append(word)
        elif word == "decoder" or (word in _KIND_WORDS and any(ch.isdigit() for w in kept for ch in w)):
            kinds.append(word)
            tags.append(word)
        elif word in _SIZE_CLASS_WORDS or _KTOKEN_RE.match(word):
            tags.append(word)  # "Phi-3-mini-128k-instruct": the model's own words, not a context
        elif word not in _DROP_WORDS:
            kept.append(word)
    if len(kept) >= 2 and kept[0] == "meta" and kept[1].startswith("llama"):
        kept = kept[1:]
    # The version goes onto the first word only: Llama-3.2 -> llama3.2 but
    # llm-jp-3 stays llm-jp-3 and DeepSeek-R1-0528 stays deepseek-r1-0528.
    if len(kept) >= 2 and kept[0].isalpha() and _NUMBER_RE.match(kept[1]):
        kept[:2] = [kept[0] + kept[1]]
    if not kept:
        return None, kinds, tunings, tags
    family = "-".join(kept)
    for pattern, repl in _FAMILY_FIXES:
        family = pattern.sub(repl, family)
    if not has_size and not any(ch.isdigit() for ch in family) and not family.startswith(_KNOWN_FAMILY_PREFIXES):
        # "xiaoji", "language-model", "talker-fullvocab-fixed": a project's own
        # name for a file, not a model family.
        return None, kinds, tunings, tags
    if _VISION_RE.search(family):
        kinds.insert(0, "vl")
        if family.endswith("-llm"):  # qwen2-vl-llm: the LLM half of a VL model
            family = family[: -len("-llm")]
    if "ocr" in family:
        kinds.append("ocr")
    if any("code" in word and not word.endswith(("decoder", "encoder")) for word in words):
        kinds.append("coder")
    return family, kinds, tunings, tags


def _runtime_of(token: str) -> str | None:
    """The version in a runtime tag: ``1.2.0`` from ``1.2.0``, ``v1.2.0`` or ``rkllm1.2.0``."""
    version = token.removeprefix("rkllm").removeprefix("v").strip(".")
    return version or None


def _kind_of(family: str | None, kinds: Sequence[str], tokens: Sequence[str]) -> ModelKind:
    """What a model is for, from its family, kinds and every word of its name."""
    words = set(tokens) | set(kinds) | set((family or "").split("-"))
    if words & _EMBEDDING_WORDS:
        return "embedding"
    if words & _RERANKER_WORDS:
        return "reranker"
    if "vl" in kinds or "ocr" in kinds or words & _VISION_WORDS or (family and _VISION_RE.search(family)):
        return "vision"
    return "chat"


@dataclass(slots=True)
class _Settings:
    """What the words after a model's name say, read one word at a time.

    The size and the conversion settings (quantisation, platform, optimisation
    level, hybrid ratio, NPU cores, context, runtime version), and the tunings,
    kinds and tags (see :attr:`ModelFacts.tags`) that stand among them.
    """

    size: str | None = None
    ctx: int | None = None
    explicit_ctx: bool = False  # a ctx word (``ctx4096``) wins over bare numbers and ``16k``
    dtype: str | None = None
    opt: int | None = None
    hybrid: float | None = None
    npu: int | None = None
    platform: str | None = None
    runtime: str | None = None
    kinds: list[str] = field(default_factory=list)
    tunings: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def read(self, rest: Sequence[str]) -> None:
        """Take in the words after the name, in order."""
        index = 0
        while index < len(rest):
            token, ahead = rest[index], rest[index + 1 :]
            used = self._setting(token, ahead)
            if used is None:
                self._word(token)
            index += 1 + (used or 0)

    def _setting(self, token: str, ahead: Sequence[str]) -> int | None:
        """Read ``token`` as the size or a conversion setting.

        Returns:
            How many of the words ``ahead`` it used (``opt 0``, ``w4a16 g128``), or None
            when ``token`` is neither.
        """
        following = ahead[0] if ahead else ""
        if self.size is None and _SIZE_RE.match(token):
            self.size = token
        elif PLATFORM_RE.match(token):
            self.platform = self.platform or token
        elif token in _BARE_SOCS:
            self.platform = self.platform or f"rk{token}"
        elif _DTYPE_RE.match(token):
            grouped = bool(_GROUP_RE.match(following))
            self.dtype = self.dtype or (f"{token}_{following}" if grouped else token)
            return int(grouped)
        elif match := (_OPT_RE.match(token) or _SHORT_OPT_RE.match(token)):
            self.opt = int(match.group(1))
        elif token == "opt" and _INT_RE.match(following):
            self.opt = int(following)
            return 1
        elif match := _HYBRID_RE.match(token):
            self.hybrid = float(match.group(1))
        elif token == "hybrid":
            return self._hybrid_ratio(ahead)
        elif match := _NPU_RE.match(token):
            self.npu = int(match.group(1))
        elif token == "npu" and _INT_RE.match(following):
            self.npu = int(following)
            return 1
        else:
            return self._context_or_runtime(token, following)
        return 0

    def _hybrid_ratio(self, ahead: Sequence[str]) -> int:
        """The ratio after a ``hybrid`` word (``hybrid 0.5``, ``hybrid ratio 0.5``); returns the words used."""
        used = 1 if ahead[:1] == ["ratio"] else 0
        if used < len(ahead) and _NUMBER_RE.match(ahead[used]):
            self.hybrid = float(ahead[used])
            used += 1
        return used

    def _context_or_runtime(self, token: str, following: str) -> int | None:
        """Read ``token`` as a context length or a runtime version (see :meth:`_setting`)."""
        if match := _CTX_RE.match(token):
            self.ctx, self.explicit_ctx = _ctx_value(match.group(1), bool(match.group(2))), True
        elif token == "ctx" and (_INT_RE.match(following) or _KTOKEN_RE.match(following)):
            self.ctx, self.explicit_ctx = _ctx_value(following.rstrip("k"), following.endswith("k")), True
            return 1
        elif (match := _KTOKEN_RE.match(token)) and not self.explicit_ctx:
            self.ctx = _ctx_value(match.group(1), True)
        elif _VERSION_RE.match(token):
            self.runtime = self.runtime or _runtime_of(token)
        else:
            return None
        return 0

    def _word(self, token: str) -> None:
        """Read ``token`` as a tuning, a kind, a bare context length or a tag; anything else says nothing."""
        if token in _TUNING_WORDS:
            self.tunings.append(token)
            if token not in _GENERIC_TUNINGS:
                self.tags.append(token)
        elif token in _KIND_WORDS or token == "decoder":
            self.kinds.append(token)
            self.tags.append(token)
        elif _INT_RE.match(token) and int(token) >= 1024 and int(token) % 1024 == 0:
            if not self.explicit_ctx:  # "Qwen3-8B-4096": a bare context length
                self.ctx = int(token)
        elif _is_tag(token):
            self.tags.append(token)
        # Anything else (other numbers such as "122", "llm", "hf", orgs) says nothing.


def _is_tag(token: str) -> bool:
    """Whether a word after the name tells the model from its base model (see :attr:`ModelFacts.tags`)."""
    return bool(
        _DATE_TAG_RE.match(token)
        or _MODEL_VERSION_RE.match(token)
        or _SIZE_RE.match(token)  # a second size: "Qwen2.5-7B-Instruct-1M"
        or _ACTIVE_SIZE_RE.match(token)
        or (token.isalpha() and token not in _NOISE_WORDS and token not in _KNOWN_ORGS and not _ends_name(token))
    )


def parse_model_filename(filename: str) -> ModelFacts:
    """Read the facts a ``.rkllm`` file name carries.

    Handles the naming styles seen in the wild: the vendor toolkit's
    ``Qwen3-1.7B-rk3588-w8a8_g128-opt-0-hybrid-ratio-0.5``, the
    ``Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588`` style with an
    organisation prefix, underscore styles (``qwen3_0.6b_w4a16_g64_rk3562``,
    ``internlm2_5-1_8b-chat``), ``16k`` context tokens, bare SoC numbers and
    runtime versions (``Qwen3-4B-1.2.0``, ``rkllm1.1.4``). Nothing is read
    from disk.

    Args:
        filename: a file name or path; a ``.rkllm`` suffix is optional.

    Returns:
        The facts; a fact the name does not carry is None.
    """
    tokens = _tokenise(_strip_org(_strip_suffix(filename)))
    cut = next((index for index, token in enumerate(tokens) if _ends_name(token)), len(tokens))
    words, settings = tokens[:cut], _Settings()
    if words and (kilo := _KTOKEN_RE.match(words[-1])):
        # "qwen3-16k-w8a8": a context token right before the metadata. One
        # followed by more name words is the model's own ("Phi-3-mini-128k-instruct").
        settings.ctx = _ctx_value(kilo.group(1), True)
        words.pop()
    settings.read(tokens[cut:])
    size = settings.size
    family, kinds, tunings, tags = _family_of(words, size is not None)
    ordered_kinds = [kind for kind in _KIND_ORDER if kind in kinds or kind in settings.kinds]
    all_tunings = list(dict.fromkeys(tunings + settings.tunings))
    variant = "-".join(ordered_kinds + all_tunings) or None
    label = "-".join(words) or "-".join(t for t in tokens if t != size) or "model"
    return ModelFacts(
        family=family,
        size=size,
        variant=variant,
        dtype=settings.dtype,
        opt=settings.opt,
        hybrid=settings.hybrid,
        npu_cores=settings.npu,
        ctx=settings.ctx,
        platform=settings.platform,
        label=label,
        runtime=settings.runtime,
        tags=tuple(dict.fromkeys(tags + settings.tags)),
        kind=_kind_of(family, ordered_kinds, tokens),
    )


def friendly_name(facts: ModelFacts) -> str:
    """The base name of a model: family, kind words, size and qualifiers.

    ``<family>[-<kind words>][-<size>][-<qualifiers>]``, lower case:
    ``qwen3-0.6b``, ``qwen3-embedding-0.6b``, ``qwen2.5-coder-1.5b``,
    ``qwen3-4b-thinking-2507``, ``deepseek-r1-distill-qwen-7b``,
    ``phi3.5-mini``. The kind words are the ``facts.tags`` that are kinds; the
    qualifiers are the other tags. When the family is unknown the file's own
    name words (``facts.label``) stand in for it (``xiaoji``, ``decoder``).

    Args:
        facts: facts from :func:`parse_model_filename`.

    Returns:
        The friendly name, before any disambiguation.
    """
    if facts.family:
        kind_words = [tag for tag in facts.tags if tag in _KIND_ORDER]
        qualifiers = [tag for tag in facts.tags if tag not in _KIND_ORDER]
        parts = [facts.family, *kind_words, facts.size, *qualifiers]
    else:
        own = set(facts.label.split("-"))
        parts = [facts.label, facts.size, *(tag for tag in facts.tags if tag not in own)]
    name = "-".join(part for part in parts if part)
    return re.sub(r"\s+", "-", name.strip().lower())


# --------------------------------------------------------------------------
# Disambiguation
# --------------------------------------------------------------------------

#: Word used as the suffix of a file that states none of the facts chosen to
#: tell its group apart.
PLAIN_SUFFIX: Final = "plain"


def _ctx_suffix(ctx: int) -> str:
    return f"ctx{ctx // 1024}k" if ctx % 1024 == 0 else f"ctx{ctx}"


def _tuning_suffix(variant: str | None) -> str | None:
    generic = [word for word in (variant or "").split("-") if word in _GENERIC_TUNINGS]
    return "-".join(generic) or None


# The facts that may tell files sharing a base name apart, in the order they
# are tried and written, each as a function giving its suffix word (None: the
# name does not say). Each function's words look like no other's, so a suffix
# can be read back unambiguously.
_SEPARATING_FACTS: Final[tuple[Callable[[ModelFacts], str | None], ...]] = (
    lambda f: f.dtype,
    lambda f: f.platform,
    lambda f: _ctx_suffix(f.ctx) if f.ctx else None,
    lambda f: None if f.opt is None else f"opt{f.opt}",
    lambda f: None if f.hybrid is None else f"hybrid{f.hybrid:g}",
    lambda f: None if f.npu_cores is None else f"npu{f.npu_cores}",
    lambda f: None if f.runtime is None else f"rkllm{f.runtime}",
    lambda f: _tuning_suffix(f.variant),
)


def _separating_values(facts: ModelFacts) -> tuple[str | None, ...]:
    """The suffix words of every fact that may tell siblings apart (None where the name says nothing).

    Two files sharing a base name with equal values are identical in every
    fact their names carry; only those are told apart by a counter.
    """
    return tuple(fact(facts) for fact in _SEPARATING_FACTS)


def _disambiguate(base: str, group: Sequence[ModelFacts]) -> list[str]:
    """Give each member of a group sharing ``base`` a distinct name made of its facts.

    The suffix is the member's words for the smallest set of separating facts
    (the first such set, trying sets by size and then in the order of
    ``_SEPARATING_FACTS``: dtype, platform, context, optimisation level, hybrid
    ratio, NPU cores, runtime version, ``instruct``/``it``/``chat``) under
    which two members get the same suffix only if they are identical in every
    one of those facts. A member that states none of the chosen facts gets
    :data:`PLAIN_SUFFIX`. Identical members get a 1-based counter in the
    group's order (the registry sorts each group by path).

    The choice is stable: a set that still separates the group after a member
    is added is still the first such set, so adding a file renames its
    siblings only when their names no longer tell it apart.

    Args:
        base: the group's shared friendly name.
        group: the members' facts, in the group's order.

    Returns:
        One name per member, in the same order.
    """
    values = [_separating_values(facts) for facts in group]
    suffixes: list[str] = [""] * len(group)
    found = False
    for width in range(len(_SEPARATING_FACTS) + 1):
        for combo in itertools.combinations(range(len(_SEPARATING_FACTS)), width):
            suffixes = [
                "-".join(v for v in (member[i] for i in combo) if v) or (PLAIN_SUFFIX if width else "")
                for member in values
            ]
            meaning: dict[str, tuple[str | None, ...]] = {}
            if all(
                meaning.setdefault(suffix, member) == member for suffix, member in zip(suffixes, values, strict=True)
            ):
                found = True
                break
        if found:
            break
    counts: dict[tuple[str | None, ...], int] = {}
    for member in values:
        counts[member] = counts.get(member, 0) + 1
    seen: dict[tuple[str | None, ...], int] = {}
    names: list[str] = []
    for suffix, member in zip(suffixes, values, strict=True):
        parts = [base, suffix] if suffix else [base]
        if counts[member] > 1:
            seen[member] = seen.get(member, 0) + 1
            parts.append(str(seen[member]))
        names.append("-".join(parts))
    return names
