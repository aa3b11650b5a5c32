"""Find ``.rkllm`` model files, give them friendly names, and look them up.

A model is a file ending in ``.rkllm`` (any case) found directly in a model
directory or one level below it (``models/qwen3/Qwen3-0.6B-w8a8.rkllm``).
Hidden files and directories (names starting with ``.``) are skipped.

Model directories, first match wins (see :func:`default_model_dirs`):

1. the ``model_dirs`` argument;
2. ``RKLLM_MODEL_DIR``, an ``os.pathsep``-separated list;
3. ``$XDG_DATA_HOME/rkllm/models`` (or ``~/.local/share/rkllm/models``) and
   ``./models``.

Names: every file gets a friendly name from its file name (see
:func:`parse_model_filename` and :func:`friendly_name`), e.g.
``Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm`` is
``qwen3-0.6b``. When two files share a friendly name each gets a visible
suffix (``qwen3-0.6b-w8a8`` / ``qwen3-0.6b-w4a16``) and the bare name
resolves only if exactly one of them was built for this board's platform;
otherwise looking it up raises :class:`~rkllm_core.errors.ModelNotFoundError`
listing the candidates. A model can also be looked up by an alias, by its
file name (with or without ``.rkllm``), by a loose form of any of those (case,
``-``, ``_``, ``.`` and spaces ignored, except between two digits: ``Qwen3 0.6B``
finds ``qwen3-0.6b`` but ``qwen3-06b`` does not) and by a path to the file.

Registry file: an optional ``rkllm-models.toml`` in a model directory (not in
its subdirectories) adds aliases and per-model defaults::

    [models."qwen3-0.6b"]            # key: friendly name, file name, or file stem
    aliases = ["qwen", "small"]
    system_prompt = "You are terse."
    temperature = 0.7
    top_p = 0.9
    top_k = 20
    repeat_penalty = 1.1
    frequency_penalty = 0.0
    presence_penalty = 0.0
    mirostat = 0                     # 0, 1 or 2
    mirostat_tau = 5.0
    mirostat_eta = 0.1
    max_new_tokens = 512             # -1: no limit
    max_context_len = 8192           # also the context size when the file name has none
    chat_template = { system = "...", prefix = "...", postfix = "..." }

Every key is optional. Sampling values and the two limits must be what
:class:`~rkllm_core.params.SamplingParams` and
:class:`~rkllm_core.params.InitParams` accept (the same checks run), so a
registry file can never hold a value the runtime would refuse.

Keys are matched case-insensitively against the models found under the file's
own directory first and against all models when none matches there. A key
that matches several models (an ambiguous friendly name) sets the defaults of
all of them but its aliases are refused. When several entries set the same
field for one model, the first wins (directories in search order, entries in
file order). Unknown keys are logged as warnings. A value of the wrong type or
out of range makes that one entry invalid: it is ignored, logged as an error
and listed in :attr:`ModelRegistry.errors` as an
:class:`~rkllm_core.errors.InvalidParameterError`; a file that is not valid
TOML is ignored as a whole the same way. An alias that is already another
model's name, file name or alias is refused with a warning; an alias may claim
an ambiguous friendly name for one of the models that share it.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from ..errors import (
    InvalidParameterError,
    ModelFileError,
    ModelNotFoundError,
    NoModelsFoundError,
)
from ..params import InitParams, SamplingParams

__all__ = [
    "DEFAULT_CONTEXT_SIZE",
    "DEVICE_TREE_COMPATIBLE",
    "ENV_MODEL_DIR",
    "REGISTRY_FILENAME",
    "ModelDefaults",
    "ModelFacts",
    "ModelInfo",
    "ModelRegistry",
    "RegistryEntry",
    "default_model_dirs",
    "detect_board_platform",
    "friendly_name",
    "load_registry_file",
    "parse_model_filename",
    "platform_matches",
    "soc_series",
]

logger = logging.getLogger(__name__)

#: Context size assumed when neither the file name nor the registry file gives one.
DEFAULT_CONTEXT_SIZE: Final = 4096
#: Environment variable listing model directories (``os.pathsep``-separated).
ENV_MODEL_DIR: Final = "RKLLM_MODEL_DIR"
#: Name of the optional registry file in a model directory.
REGISTRY_FILENAME: Final = "rkllm-models.toml"
#: Where the board's SoC is read from.
DEVICE_TREE_COMPATIBLE: Final = "/proc/device-tree/compatible"

_SUFFIX = ".rkllm"
# A directory whose mtime is this close to the scan is re-scanned at the next
# refresh: many file systems stamp mtimes with a coarse clock (a kernel tick;
# two seconds on FAT), so a file created just after a scan may leave the
# directory's mtime unchanged.
_RACY_NS = 2_000_000_000


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
_PLATFORM_RE: Final = re.compile(r"^(?:rk|rv)\d{4}[a-z]?$")
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
        or _PLATFORM_RE.match(token)
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
        elif _PLATFORM_RE.match(token):
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
# Platform
# --------------------------------------------------------------------------


def detect_board_platform(path: str | Path = DEVICE_TREE_COMPATIBLE) -> str | None:
    """Read the board's Rockchip SoC from the device tree.

    Args:
        path: the device tree's ``compatible`` file (NUL-separated
            ``vendor,model`` strings, most specific first).

    Returns:
        The SoC exactly as the device tree names it (``rk3588``, ``rk3588s``,
        ``rk3576``, ``rv1126b``), or None when the file is unreadable or names
        no Rockchip SoC. Compare with :func:`platform_matches`.
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    for raw in data.split(b"\0"):
        vendor, _, model = raw.decode("ascii", "replace").strip().lower().partition(",")
        if vendor == "rockchip" and _PLATFORM_RE.match(model):
            return model
    return None


def soc_series(platform: str) -> str:
    """The SoC series a platform belongs to: ``rk3588s`` and ``rk3588j`` are ``rk3588``.

    Only an ``rk`` SoC's trailing letter is dropped: ``rv1126b`` is a different
    chip from ``rv1126``.

    Args:
        platform: a platform name such as ``RK3588S``.

    Returns:
        The lower-case series name.
    """
    lowered = platform.strip().lower()
    if re.fullmatch(r"rk\d{4}[a-z]", lowered):
        return lowered[:-1]
    return lowered


def platform_matches(model_platform: str | None, board_platform: str | None) -> bool:
    """Whether a model converted for ``model_platform`` suits ``board_platform``.

    Args:
        model_platform: the model's target, e.g. ``rk3588``.
        board_platform: the board's SoC, e.g. ``rk3588s``.

    Returns:
        True when both are known and in the same SoC series.
    """
    if not model_platform or not board_platform:
        return False
    return soc_series(model_platform) == soc_series(board_platform)


# --------------------------------------------------------------------------
# Model records
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """Per-model defaults from the registry file; None means not set.

    Attributes:
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        top_k: top-k sampling (0 disables).
        repeat_penalty: repetition penalty.
        frequency_penalty: frequency penalty.
        presence_penalty: presence penalty.
        mirostat: mirostat mode (0, 1 or 2).
        mirostat_tau: mirostat target entropy.
        mirostat_eta: mirostat learning rate.
        max_new_tokens: generation limit (-1 for none).
        system_prompt: default system prompt.
        max_context_len: context length to initialise the model with.
        chat_template: ``(system, prefix, postfix)`` strings for
            ``rkllm_set_chat_template``.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    max_new_tokens: int | None = None
    system_prompt: str | None = None
    max_context_len: int | None = None
    chat_template: tuple[str, str, str] | None = None

    def as_dict(self) -> dict[str, object]:
        """The fields that are set.

        Returns:
            A mapping of field name to value, without the unset (None) fields.
        """
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def sampling(self) -> SamplingParams:
        """The sampling fields as :class:`~rkllm_core.params.SamplingParams`."""
        return SamplingParams(**{k: getattr(self, k) for k in _SAMPLING_FIELDS})

    def merged(self, other: ModelDefaults) -> ModelDefaults:
        """These defaults with the fields they leave unset taken from ``other``.

        Args:
            other: lower-priority defaults.

        Returns:
            The merged defaults.
        """
        changes: dict[str, Any] = {k: v for k, v in other.as_dict().items() if getattr(self, k) is None}
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model file as the registry knows it.

    Attributes:
        name: the friendly name, with a suffix when it had to be disambiguated.
        path: the resolved path of the file.
        filename: the file's name.
        facts: what the file name says.
        context_size: the context limit: from the file name, else the
            registry file's ``max_context_len``, else 4096.
        context_from_name: whether ``context_size`` came from the file name.
        file_size: the file's size in bytes.
        aliases: extra names from the registry file.
        defaults: per-model defaults from the registry file.
    """

    name: str
    path: Path
    filename: str
    facts: ModelFacts
    context_size: int = DEFAULT_CONTEXT_SIZE
    context_from_name: bool = False
    file_size: int = 0
    aliases: tuple[str, ...] = ()
    defaults: ModelDefaults = ModelDefaults()

    @property
    def dtype(self) -> str | None:
        """The quantisation from the file name (``w8a8``), if any."""
        return self.facts.dtype

    @property
    def platform(self) -> str | None:
        """The target SoC from the file name (``rk3588``), if any."""
        return self.facts.platform

    @property
    def size_mb(self) -> float:
        """The file size in MiB."""
        return self.file_size / (1024 * 1024)

    @property
    def stem(self) -> str:
        """The file name without ``.rkllm``."""
        return _strip_suffix(self.filename)


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One valid ``[models."<key>"]`` table of a registry file.

    Attributes:
        key: the table's key, lower case.
        aliases: the aliases it asks for.
        defaults: the defaults it sets.
        source: the registry file.
    """

    key: str
    aliases: tuple[str, ...]
    defaults: ModelDefaults
    source: Path


# --------------------------------------------------------------------------
# Registry file
# --------------------------------------------------------------------------

# Sampling settings a registry file may set: those SamplingParams and ModelDefaults share.
_SAMPLING_FIELDS: Final = tuple(
    f.name for f in fields(SamplingParams) if f.name in {g.name for g in fields(ModelDefaults)}
)
_FLOAT_FIELDS: Final = frozenset(
    {"temperature", "top_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "mirostat_tau", "mirostat_eta"}
)
_INIT_FIELDS: Final = ("max_new_tokens", "max_context_len")
_ENTRY_KEYS: Final = frozenset(_SAMPLING_FIELDS) | set(_INIT_FIELDS) | {"aliases", "system_prompt", "chat_template"}
_TEMPLATE_KEYS: Final = ("system", "prefix", "postfix")


def _parse_entry(key: str, table: object, source: Path) -> RegistryEntry:
    """Validate one ``[models."<key>"]`` table.

    Sampling values and limits are checked by :class:`SamplingParams` and
    :class:`InitParams`, so the registry file accepts exactly what the runtime does.
    """
    where = f'{source}: [models."{key}"]'
    if not isinstance(table, dict):
        raise InvalidParameterError(f"{where} must be a table, got {table!r}")
    for name in table:
        if name not in _ENTRY_KEYS:
            logger.warning("%s: unknown key %r ignored", where, name)
    changes: dict[str, Any] = {k: table[k] for k in (*_SAMPLING_FIELDS, *_INIT_FIELDS) if k in table}
    try:
        SamplingParams(**{k: v for k, v in changes.items() if k in _SAMPLING_FIELDS})
        InitParams(**{k: v for k, v in changes.items() if k in _INIT_FIELDS})
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{where}: {exc}") from exc
    changes.update({k: float(v) for k, v in changes.items() if k in _FLOAT_FIELDS})

    if "system_prompt" in table:
        if not isinstance(table["system_prompt"], str):
            raise InvalidParameterError(f"{where}: system_prompt must be a string, got {table['system_prompt']!r}")
        changes["system_prompt"] = table["system_prompt"]
    if "chat_template" in table:
        value = table["chat_template"]
        if not isinstance(value, dict) or set(value) - set(_TEMPLATE_KEYS):
            raise InvalidParameterError(
                f"{where}: chat_template must be a table of system, prefix and postfix, got {value!r}"
            )
        parts = tuple(value.get(part, "") for part in _TEMPLATE_KEYS)
        if not all(isinstance(p, str) for p in parts):
            raise InvalidParameterError(f"{where}: chat_template values must be strings, got {value!r}")
        changes["chat_template"] = parts
    aliases: tuple[str, ...] = ()
    if "aliases" in table:
        value = table["aliases"]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(a, str) and a.strip() for a in items):
            raise InvalidParameterError(f"{where}: aliases must be a list of non-empty strings, got {value!r}")
        aliases = tuple(dict.fromkeys(str(a).strip() for a in items))
    defaults = replace(ModelDefaults(), **changes)
    return RegistryEntry(key=key.strip().lower(), aliases=aliases, defaults=defaults, source=source)


def _read_registry_file(path: Path) -> tuple[list[RegistryEntry], list[InvalidParameterError]]:
    """Parse a registry file leniently: bad entries are reported, good ones kept."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [], [InvalidParameterError(f"{path}: cannot read registry file: {exc}")]
    for key in document:
        if key != "models":
            logger.warning("%s: unknown top-level key %r ignored", path, key)
    models = document.get("models", {})
    if not isinstance(models, dict):
        return [], [InvalidParameterError(f'{path}: models must be a table of [models."<name>"] tables')]
    entries: list[RegistryEntry] = []
    errors: list[InvalidParameterError] = []
    for key, table in models.items():
        try:
            entries.append(_parse_entry(str(key), table, path))
        except InvalidParameterError as exc:
            errors.append(exc)
    return entries, errors


def load_registry_file(path: str | Path) -> list[RegistryEntry]:
    """Parse a registry file strictly.

    Unknown keys are only logged.

    Args:
        path: the ``rkllm-models.toml`` file.

    Returns:
        Its entries, in file order.

    Raises:
        InvalidParameterError: the file is unreadable or not TOML, or an
            entry has a value of the wrong type or out of range (the message
            names the file, the entry and the key).
    """
    entries, errors = _read_registry_file(Path(path))
    if errors:
        raise errors[0]
    return entries


# --------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------


def _user_model_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "rkllm" / "models"


def default_model_dirs(model_dirs: Sequence[str | Path] | str | Path | None = None) -> list[Path]:
    """The directories to look for models in, in priority order.

    Args:
        model_dirs: explicit directories; they win when given. A single
            string or path is one directory.

    Returns:
        Absolute paths, duplicates removed: ``model_dirs``; else
        ``RKLLM_MODEL_DIR`` split on ``os.pathsep``; else
        ``$XDG_DATA_HOME/rkllm/models`` (``~/.local/share/rkllm/models``) and
        ``./models``. The directories need not exist.
    """
    if isinstance(model_dirs, str | Path):
        chosen: list[str | Path] = [model_dirs]
    elif model_dirs is not None:
        chosen = list(model_dirs)
    elif os.environ.get(ENV_MODEL_DIR, "").strip():
        chosen = [p for p in os.environ[ENV_MODEL_DIR].split(os.pathsep) if p.strip()]
    else:
        chosen = [_user_model_dir(), Path("models")]
    result: list[Path] = []
    for item in chosen:
        path = Path(os.path.abspath(Path(item).expanduser()))
        if path not in result:
            result.append(path)
    return result


def _is_model_file(name: str) -> bool:
    return name.lower().endswith(_SUFFIX)


def _scan(dirs: Sequence[Path]) -> tuple[list[tuple[Path, str, Path, int]], list[Path]]:
    """List the model files under ``dirs`` and one level below.

    Returns:
        ``(resolved path, file name, model dir, size)`` per distinct file in
        discovery order, and the subdirectories that were listed. The file
        name is the directory entry's (a symlink's own name, not its target's).
    """
    found: list[tuple[Path, str, Path, int]] = []
    seen: set[Path] = set()
    subdirs: list[Path] = []

    def add(entry: os.DirEntry[str], home: Path) -> None:
        try:
            if not entry.is_file():
                return
            resolved = Path(entry.path).resolve()
            size = os.stat(resolved).st_size
        except OSError as exc:
            logger.warning("skipping model file %s: %s", entry.path, exc)
            return
        if resolved not in seen:
            seen.add(resolved)
            found.append((resolved, entry.name, home, size))

    def listing(directory: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as it:
                return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            logger.warning("cannot list model directory %s: %s", directory, exc)
            return []

    for directory in dirs:
        for entry in listing(directory):
            if _is_model_file(entry.name):
                add(entry, directory)
            elif _is_dir(entry):
                subdirs.append(Path(entry.path))
                for sub in listing(Path(entry.path)):
                    if _is_model_file(sub.name):
                        add(sub, directory)
    return found, subdirs


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


# --------------------------------------------------------------------------
# Naming and indexing
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Found:
    path: Path  # resolved
    filename: str  # as found in the directory
    home: Path  # the model directory it was found under
    size: int
    facts: ModelFacts


def _normalise(key: str) -> str:
    """The loose form of a key: lower case, separators dropped except between numbers.

    ``Qwen3 0.6B``, ``QWEN3_0.6B`` and ``qwen3-0.6b`` are alike, but a
    separator between two digits survives (as ``.`` when it is a decimal
    point, else ``-``): dropping it would make ``qwen3-1.5b`` and
    ``qwen3-15b``, or ``qwen3-0.6b`` and ``qwen3-06b``, the same model.
    """
    key = re.sub(r"(?<=\d)\.(?=\d)", "\0", key.lower().strip())
    key = re.sub(r"(?<=\d)[-_.\s]+(?=\d)", "\1", key)
    return re.sub(r"[-_.\s]+", "", key).replace("\0", ".").replace("\1", "-")


def _ctx_suffix(ctx: int) -> str:
    return f"ctx{ctx // 1024}k" if ctx % 1024 == 0 else f"ctx{ctx}"


def _disambiguate(base: str, group: Sequence[ModelFacts]) -> list[str]:
    """Give each member of a group sharing ``base`` a distinct visible suffix.

    The suffix is the smallest combination of variant, dtype, platform and
    context (tried in that order) that tells all members apart; failing that,
    a 1-based index in the group's order (sorted by path).
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


def _assign_names(found: Sequence[_Found]) -> tuple[list[str], dict[str, list[int]]]:
    """Name every file; returns the names and the friendly names shared by several files."""
    groups: dict[str, list[int]] = {}
    for position, item in enumerate(found):
        groups.setdefault(friendly_name(item.facts), []).append(position)
    names = [""] * len(found)
    shared: dict[str, list[int]] = {}
    for base, members in groups.items():
        if len(members) == 1:
            names[members[0]] = base
        else:
            shared[base] = sorted(members, key=lambda i: str(found[i].path))
    taken = {name for name in names if name}
    for base in sorted(shared):
        members = shared[base]
        for position, name in zip(members, _disambiguate(base, [found[i].facts for i in members]), strict=True):
            unique, counter = name, 2
            while unique in taken:  # a suffixed name that is another model's name
                unique, counter = f"{name}-{counter}", counter + 1
            names[position] = unique
            taken.add(unique)
    return names, shared


def _apply_registry(
    found: Sequence[_Found], names: Sequence[str], entries: Sequence[RegistryEntry]
) -> tuple[list[ModelDefaults], list[tuple[str, ...]]]:
    """Match registry entries to files; returns each file's defaults and accepted aliases."""
    keys = [
        {names[i], friendly_name(item.facts), item.filename.lower(), _strip_suffix(item.filename).lower()}
        for i, item in enumerate(found)
    ]
    defaults = [ModelDefaults() for _ in found]
    wanted: list[tuple[int, str]] = []  # (file, alias) in entry order
    for entry in entries:
        matches = [i for i in range(len(found)) if entry.key in keys[i]]
        matches = [i for i in matches if found[i].home == entry.source.parent] or matches
        if not matches:
            logger.warning('%s: [models."%s"] matches no model file', entry.source, entry.key)
            continue
        for i in matches:
            defaults[i] = defaults[i].merged(entry.defaults)
        if entry.aliases and len(matches) > 1:
            logger.warning(
                '%s: [models."%s"] matches %s; its aliases are ignored',
                entry.source,
                entry.key,
                ", ".join(sorted(names[i] for i in matches)),
            )
        elif entry.aliases:
            wanted += [(matches[0], alias) for alias in entry.aliases]

    # An alias that already names another model is refused; one that a model
    # shares with others (an ambiguous friendly name) it may claim.
    claims: dict[str, set[int]] = {}
    for i, own in enumerate(keys):
        for key in own:
            claims.setdefault(key, set()).add(i)
    accepted: list[list[str]] = [[] for _ in found]
    for i, alias in wanted:
        key = alias.lower()
        holders = claims.get(key, set())
        if holders and i not in holders:
            logger.warning(
                "alias %r for %s refused: it already names %s",
                alias,
                names[i],
                ", ".join(sorted(names[j] for j in holders)),
            )
        elif holders != {i}:
            claims[key] = {i}
            accepted[i].append(alias)
    return defaults, [tuple(a) for a in accepted]


def _add_keys(index: dict[str, ModelInfo | tuple[str, ...]], keys: Mapping[str, Iterable[ModelInfo]]) -> None:
    """Add one priority level of keys; a key already present is left alone."""
    for key, infos in keys.items():
        if key not in index:
            unique = {info.name: info for info in infos}
            index[key] = next(iter(unique.values())) if len(unique) == 1 else tuple(sorted(unique))


def _build_index(
    infos: Sequence[ModelInfo], bare: Mapping[str, Sequence[ModelInfo]]
) -> tuple[dict[str, ModelInfo | tuple[str, ...]], dict[str, ModelInfo | tuple[str, ...]]]:
    """The lower-case key index and the loose (normalised) one.

    A key maps to its model or, when it fits several, to their names. Keys by
    priority: names, aliases, shared friendly names (``bare``), file names and
    stems.
    """
    index: dict[str, ModelInfo | tuple[str, ...]] = {}
    _add_keys(index, {info.name.lower(): [info] for info in infos})
    levels: list[dict[str, list[ModelInfo]]] = [{}, {}]
    for info in infos:
        for alias in info.aliases:
            levels[0].setdefault(alias.lower(), []).append(info)
        for key in (info.filename.lower(), info.stem.lower()):
            levels[1].setdefault(key, []).append(info)
    _add_keys(index, levels[0])
    _add_keys(index, bare)
    _add_keys(index, levels[1])

    by_name = {info.name: info for info in infos}
    loose_keys: dict[str, list[ModelInfo]] = {}
    for key, hit in index.items():
        targets = [hit] if isinstance(hit, ModelInfo) else [by_name[n] for n in hit]
        loose_keys.setdefault(_normalise(key), []).extend(targets)
    loose: dict[str, ModelInfo | tuple[str, ...]] = {}
    _add_keys(loose, loose_keys)
    return index, loose


def _make_info(
    name: str,
    path: Path,
    filename: str,
    facts: ModelFacts,
    size: int,
    aliases: tuple[str, ...] = (),
    defaults: ModelDefaults = ModelDefaults(),  # noqa: B008 - frozen, shared safely
) -> ModelInfo:
    if facts.ctx:
        context, from_name = facts.ctx, True
        if defaults.max_context_len and defaults.max_context_len > facts.ctx:
            logger.warning(
                "%s: max_context_len %d is above the %d its file name says it was converted for",
                name,
                defaults.max_context_len,
                facts.ctx,
            )
    else:
        context, from_name = defaults.max_context_len or DEFAULT_CONTEXT_SIZE, False
    return ModelInfo(
        name=name,
        path=path,
        filename=filename,
        facts=facts,
        context_size=context,
        context_from_name=from_name,
        file_size=size,
        aliases=aliases,
        defaults=defaults,
    )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    models: tuple[ModelInfo, ...] = ()
    index: Mapping[str, ModelInfo | tuple[str, ...]] = field(default_factory=dict)
    loose: Mapping[str, ModelInfo | tuple[str, ...]] = field(default_factory=dict)
    by_path: Mapping[Path, ModelInfo] = field(default_factory=dict)
    errors: tuple[InvalidParameterError, ...] = ()


_AUTO: Final = "auto"
_Signature = tuple[tuple[str, int, int, int] | tuple[str], ...]


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------


class ModelRegistry:
    """The ``.rkllm`` models in a set of directories, looked up by name.

    The first access scans; later lookups are dictionary look-ups. A lookup
    that misses re-scans first when a directory changed (one ``stat`` per
    directory), so a file dropped in is found. Thread-safe.

    Args:
        model_dirs: directories to search (see :func:`default_model_dirs`).
        platform: this board's SoC, used to pick which of several files
            sharing a friendly name the bare name means; ``"auto"`` reads it
            from the device tree when first needed, None disables the preference.
        registry_filename: name of the registry file looked for in each model
            directory.
    """

    def __init__(
        self,
        model_dirs: Sequence[str | Path] | str | Path | None = None,
        *,
        platform: str | None = _AUTO,
        registry_filename: str = REGISTRY_FILENAME,
    ) -> None:
        """Set the registry up; nothing is read from disk until first use."""
        self._dirs: tuple[Path, ...] = tuple(default_model_dirs(model_dirs))
        self._platform_known = platform != _AUTO
        self._platform = platform.strip().lower() if self._platform_known and platform else None
        self._registry_filename = registry_filename
        self._lock = threading.Lock()
        self._snapshot = _Snapshot()
        self._loaded = False
        self._watched: tuple[Path, ...] = ()
        self._signature: _Signature = ()
        self._racy = False
        self._generation = 0
        self._warned: set[tuple[str, tuple[Path, ...]]] = set()

    # -- properties -----------------------------------------------------

    @property
    def model_dirs(self) -> list[Path]:
        """The directories searched, in priority order (some may not exist)."""
        return list(self._dirs)

    @property
    def errors(self) -> list[InvalidParameterError]:
        """Problems found in registry files at the last scan."""
        with self._lock:
            self._ensure_loaded()
            return list(self._snapshot.errors)

    @property
    def generation(self) -> int:
        """How many scans have run; it changes whenever the models may have."""
        with self._lock:
            return self._generation

    @property
    def platform(self) -> str | None:
        """The board platform used to resolve shared names (detected on first use)."""
        with self._lock:
            return self._board_platform()

    # -- public API -----------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every model found, sorted by name.

        Returns:
            The models; empty when there are none.
        """
        with self._lock:
            self._ensure_loaded()
            return list(self._snapshot.models)

    def refresh(self, force: bool = False) -> bool:
        """Re-scan the directories if any changed since the last scan.

        Checking costs one ``stat`` per directory, subdirectory and registry
        file.

        Args:
            force: re-scan even when nothing seems to have changed.

        Returns:
            Whether a scan ran.
        """
        with self._lock:
            return self._refresh_locked(force)

    def get(self, name: str | os.PathLike[str]) -> ModelInfo:
        """Look a model up.

        Accepts, case-insensitively: a friendly name (``qwen3-0.6b``), a
        disambiguated name (``qwen3-0.6b-w8a8``), an alias, a file name with
        or without ``.rkllm``, any of those with other separators (``Qwen3
        0.6B``, ``qwen3_0.6b``; a separator between two digits still counts),
        or a path (absolute, relative to the working directory or
        starting with ``~``) to an existing ``.rkllm`` file, which may lie
        outside the model directories. A miss re-scans changed directories
        once before failing.

        Args:
            name: what to look up.

        Returns:
            The model.

        Raises:
            NoModelsFoundError: there are no models at all.
            ModelNotFoundError: nothing matches, or the name is ambiguous
                (``suggestions`` then lists the candidates).
            ModelFileError: ``name`` is a path that does not exist or is not
                a ``.rkllm`` file.
        """
        query = os.fspath(name).strip()
        with self._lock:
            self._ensure_loaded()
            hit = self._lookup(query)
            if hit is None:
                path = self._as_path(query)
                if path is not None:
                    return self._model_at(*path)
                if self._refresh_locked(False):
                    hit = self._lookup(query)
            if isinstance(hit, ModelInfo):
                return hit
            if hit is not None:
                raise self._ambiguous(query, hit)
            raise self._not_found(query)

    def __contains__(self, name: object) -> bool:
        """Whether ``get(name)`` would find exactly one known model, without re-scanning."""
        if not isinstance(name, str):
            return False
        with self._lock:
            self._ensure_loaded()
            return isinstance(self._lookup(name.strip()), ModelInfo)

    def __len__(self) -> int:
        """The number of models."""
        with self._lock:
            self._ensure_loaded()
            return len(self._snapshot.models)

    def __repr__(self) -> str:
        """A short description with the directories."""
        return f"ModelRegistry({[str(d) for d in self._dirs]!r})"

    # -- lookup ---------------------------------------------------------

    def _lookup(self, query: str) -> ModelInfo | tuple[str, ...] | None:
        key = query.lower()
        hit = self._snapshot.index.get(key)
        return self._snapshot.loose.get(_normalise(key)) if hit is None else hit

    def _as_path(self, query: str) -> tuple[Path, str] | None:
        """Resolve ``query`` as a model file path: ``(resolved path, file name)`` or None."""
        separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
        explicit = any(sep in query for sep in separators) or query.startswith("~")
        if (not explicit and not query.lower().endswith(_SUFFIX)) or "\0" in query:
            return None
        path = Path(query).expanduser()
        if not path.exists():
            if explicit:
                raise ModelFileError(f"model file {str(path)!r} does not exist")
            return None
        if not path.is_file() or not path.name.lower().endswith(_SUFFIX):
            raise ModelFileError(f"{str(path)!r} is not a {_SUFFIX} model file")
        return path.resolve(), path.name

    def _model_at(self, path: Path, filename: str) -> ModelInfo:
        known = self._snapshot.by_path.get(path)
        if known is None and self._refresh_locked(False):
            known = self._snapshot.by_path.get(path)
        if known is not None:
            return known
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ModelFileError(f"cannot read model file {str(path)!r}: {exc}") from exc
        facts = parse_model_filename(filename)
        return _make_info(friendly_name(facts), path, filename, facts, size)

    def _known_names(self) -> list[str]:
        return [info.name for info in self._snapshot.models]

    def _ambiguous(self, query: str, candidates: tuple[str, ...]) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"model name {query!r} is ambiguous: it matches {', '.join(candidates)}; use one of those"
            f" names (or give one an alias in {self._registry_filename})",
            name=query,
            suggestions=candidates,
            known=self._known_names(),
        )

    def _not_found(self, query: str) -> ModelNotFoundError:
        known = self._known_names()
        if not known:
            listed = ", ".join(str(d) if d.is_dir() else f"{d} (missing)" for d in self._dirs) or "no directories"
            return NoModelsFoundError(
                f"no {_SUFFIX} models found; searched: {listed}; put model files there or set {ENV_MODEL_DIR}",
                searched=[str(d) for d in self._dirs],
            )
        suggestions = self._suggest(query)
        hint = f"; did you mean {' or '.join(repr(s) for s in suggestions[:3])}?" if suggestions else ";"
        shown = ", ".join(known[:20]) + (f", ... ({len(known) - 20} more)" if len(known) > 20 else "")
        return ModelNotFoundError(
            f"no model {query!r}{hint} known: {shown}", name=query, suggestions=suggestions, known=known
        )

    def _suggest(self, query: str) -> list[str]:
        """Names close to ``query``: close spellings of any key, then names containing it."""
        snapshot = self._snapshot
        key, loose = query.lower(), _normalise(query)
        hits: list[ModelInfo | tuple[str, ...]] = [
            snapshot.index[k] for k in difflib.get_close_matches(key, list(snapshot.index), n=5, cutoff=0.6)
        ]
        if loose:
            hits += [snapshot.loose[k] for k in difflib.get_close_matches(loose, list(snapshot.loose), n=5, cutoff=0.6)]
            hits += [info for info in snapshot.models if loose in _normalise(info.name)]
        names: dict[str, None] = {}
        for hit in hits:
            names.update(dict.fromkeys((hit.name,) if isinstance(hit, ModelInfo) else hit))
        return list(names)[:5]

    # -- scanning -------------------------------------------------------

    def _board_platform(self) -> str | None:
        if not self._platform_known:
            self._platform = detect_board_platform()
            self._platform_known = True
            logger.debug("board platform: %s", self._platform)
        return self._platform

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._rescan()

    def _current_signature(self) -> _Signature:
        signature: list[tuple[str, int, int, int] | tuple[str]] = []
        for path in self._watched:
            try:
                st = os.stat(path)
            except OSError:
                signature.append((str(path),))
            else:
                signature.append((str(path), st.st_mtime_ns, st.st_ino, st.st_size))
        return tuple(signature)

    def _refresh_locked(self, force: bool) -> bool:
        if not self._loaded or force or self._racy or self._current_signature() != self._signature:
            self._rescan()
            return True
        return False

    def _rescan(self) -> None:
        started = time.time_ns()
        files, subdirs = _scan(self._dirs)
        registry_files = [d / self._registry_filename for d in self._dirs]
        self._watched = (*self._dirs, *subdirs, *registry_files)
        self._signature = self._current_signature()
        self._racy = any(len(item) > 1 and item[1] > started - _RACY_NS for item in self._signature)
        found = [_Found(path, name, home, size, parse_model_filename(name)) for path, name, home, size in files]
        self._snapshot = self._build(found, registry_files)
        self._loaded = True
        self._generation += 1
        logger.debug("scanned %s: %d models", ", ".join(map(str, self._dirs)), len(found))

    def _build(self, found: list[_Found], registry_files: list[Path]) -> _Snapshot:
        names, shared = _assign_names(found)
        entries: list[RegistryEntry] = []
        errors: list[InvalidParameterError] = []
        for registry_file in registry_files:
            if registry_file.is_file():
                file_entries, file_errors = _read_registry_file(registry_file)
                for error in file_errors:
                    logger.error("%s (ignored)", error)
                entries += file_entries
                errors += file_errors
        defaults, aliases = _apply_registry(found, names, entries)
        infos = [
            _make_info(names[i], item.path, item.filename, item.facts, item.size, aliases[i], defaults[i])
            for i, item in enumerate(found)
        ]

        # A shared friendly name means the one file built for this board, if
        # exactly one is; otherwise it stays ambiguous.
        board = self._board_platform() if shared else None
        bare: dict[str, list[ModelInfo]] = {}
        for base, members in shared.items():
            fitting = [infos[i] for i in members if platform_matches(infos[i].platform, board)]
            bare[base] = fitting if len(fitting) == 1 else [infos[i] for i in members]
            self._warn_collision(base, [infos[i] for i in members], fitting[0] if len(fitting) == 1 else None, board)

        index, loose = _build_index(infos, bare)
        return _Snapshot(
            models=tuple(sorted(infos, key=lambda info: info.name)),
            index=index,
            loose=loose,
            by_path={info.path: info for info in infos},
            errors=tuple(errors),
        )

    def _warn_collision(self, base: str, members: list[ModelInfo], chosen: ModelInfo | None, board: str | None) -> None:
        key = (base, tuple(sorted(info.path for info in members)))
        if key in self._warned:
            return
        self._warned.add(key)
        listed = ", ".join(f"{info.name} ({info.path})" for info in members)
        if chosen is not None:
            outcome = f"{base!r} means {chosen.name}, the one built for this board ({board})"
        else:
            outcome = f"{base!r} alone is ambiguous; use the longer names"
        logger.warning("%d model files share the name %r: %s; %s", len(members), base, listed, outcome)
