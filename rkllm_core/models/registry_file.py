"""The optional ``rkllm-models.toml`` registry file: aliases and per-model defaults.

A model directory (not its subdirectories) may hold a registry file::

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
    kind = "embedding"               # chat, embedding, reranker or vision
    embedding = { pooling = "last", normalize = true, task = "...", suffix = "<|endoftext|>" }
    reranker = { template = "...{instruction}...{query}...{document}...", instruction = "...",
                 yes_token = "yes", no_token = "no", yes_id = 9693, no_id = 2152 }

Every key is optional. ``kind`` overrides the kind the file name gives (see
:data:`~rkllm_core.filenames.ModelKind`), for a model whose name does not
say what it is for. ``embedding`` and ``reranker`` override fields of the
model family's recipe, or declare one for a family that has none (see
:mod:`rkllm_core.embed.recipes`). Sampling values and the two limits must be what
:class:`~rkllm_core.params.SamplingParams` and
:class:`~rkllm_core.params.InitParams` accept (the same checks run), so a
registry file can never hold a value the runtime would refuse.

Unknown keys are logged as warnings. A value of the wrong type or out of range
makes that one entry invalid; a file that is not valid TOML is invalid as a
whole. :func:`load_registry_file` raises the first such problem as an
:class:`~rkllm_core.errors.InvalidParameterError`; the registry reads files
leniently, keeping the valid entries. How entries are matched to model files
is described in :mod:`rkllm_core.models.registry`.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from ..errors import InvalidParameterError
from ..filenames import MODEL_KINDS, ModelKind
from ..params import InitParams, SamplingParams, check_text

__all__ = [
    "REGISTRY_FILENAME",
    "ModelDefaults",
    "RegistryEntry",
    "load_registry_file",
]

logger = logging.getLogger(__name__)

#: Name of the optional registry file in a model directory.
REGISTRY_FILENAME: Final = "rkllm-models.toml"


# --------------------------------------------------------------------------
# Records
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
        kind: what the model is for, overriding its file name.
        embedding: overrides of the embedding recipe, as ``(field, value)`` pairs.
        reranker: overrides of the reranking recipe, as ``(field, value)`` pairs.
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
    kind: ModelKind | None = None
    embedding: tuple[tuple[str, Any], ...] | None = None
    reranker: tuple[tuple[str, Any], ...] | None = None

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
_ENTRY_KEYS: Final = (
    frozenset(_SAMPLING_FIELDS)
    | set(_INIT_FIELDS)
    | {"aliases", "system_prompt", "chat_template", "kind", "embedding", "reranker"}
)
_TEMPLATE_KEYS: Final = ("system", "prefix", "postfix")
# The recipe fields a registry file may set, with their types (see rkllm_core.embed.recipes).
_RECIPE_FIELDS: Final[dict[str, dict[str, type]]] = {
    "embedding": {"pooling": str, "normalize": bool, "query_template": str, "task": str, "suffix": str},
    "reranker": {
        "template": str,
        "instruction": str,
        "yes_token": str,
        "no_token": str,
        "yes_id": int,
        "no_id": int,
    },
}


def _parse_recipe(where: str, name: str, value: object) -> tuple[tuple[str, Any], ...]:
    allowed = _RECIPE_FIELDS[name]
    if not isinstance(value, dict) or not value:
        raise InvalidParameterError(f"{where}: {name} must be a table of {', '.join(allowed)}, got {value!r}")
    items: list[tuple[str, Any]] = []
    for key, item in value.items():
        kind = allowed.get(key)
        if kind is None:
            raise InvalidParameterError(f"{where}: {name}.{key} is not a recipe field ({', '.join(allowed)})")
        if not isinstance(item, kind) or (
            isinstance(item, int) and (isinstance(item, bool) != (kind is bool) or item < 0)
        ):
            raise InvalidParameterError(f"{where}: {name}.{key} must be a {kind.__name__}, got {item!r}")
        if isinstance(item, str):
            check_text(item, f"{where}: {name}.{key}")
        items.append((key, item))
    pooling = dict(items).get("pooling")
    if pooling is not None and pooling not in ("last", "mean"):
        raise InvalidParameterError(f"{where}: embedding.pooling must be 'last' or 'mean', got {pooling!r}")
    return tuple(items)


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
        changes["system_prompt"] = check_text(table["system_prompt"], f"{where}: system_prompt")
    if "chat_template" in table:
        value = table["chat_template"]
        if not isinstance(value, dict) or set(value) - set(_TEMPLATE_KEYS):
            raise InvalidParameterError(
                f"{where}: chat_template must be a table of system, prefix and postfix, got {value!r}"
            )
        parts = tuple(value.get(part, "") for part in _TEMPLATE_KEYS)
        if not all(isinstance(p, str) for p in parts):
            raise InvalidParameterError(f"{where}: chat_template values must be strings, got {value!r}")
        for part, text in zip(_TEMPLATE_KEYS, parts, strict=True):
            check_text(text, f"{where}: chat_template.{part}")
        changes["chat_template"] = parts
    if "kind" in table:
        if table["kind"] not in MODEL_KINDS:
            raise InvalidParameterError(f"{where}: kind must be one of {', '.join(MODEL_KINDS)}, got {table['kind']!r}")
        changes["kind"] = table["kind"]
    for name in _RECIPE_FIELDS:
        if name in table:
            changes[name] = _parse_recipe(where, name, table[name])
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
