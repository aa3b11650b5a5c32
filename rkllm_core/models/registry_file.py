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
    n_batch = 4                      # experimental: serve up to 4 requests in one batched run
    chat_template = { system = "...", prefix = "...", postfix = "..." }
    kind = "embedding"               # chat, embedding, reranker or vision
    sampling_policy = "reload"       # runtime 1.2: instance, reload or fixed
    embedding = { pooling = "last", normalize = true, task = "...", suffix = "<|endoftext|>" }
    reranker = { template = "...{instruction}...{query}...{document}...", instruction = "...",
                 yes_token = "yes", no_token = "no", yes_id = 9693, no_id = 2152 }
    vision_encoder = "qwen3-vl-2b_vision_672_rk3588.rknn"   # relative to this file's directory
    vision = { family = "qwen3-vl", fill = [128, 128, 128] }  # family and preprocessing overrides

Every key is optional. ``kind`` overrides the kind the file name gives (see
:data:`~rkllm_core.filenames.ModelKind`), for a model whose name does not
say what it is for. ``embedding`` and ``reranker`` override fields of the
model family's recipe, or declare one for a family that has none (see
:mod:`rkllm_core.embed.recipes`). ``vision_encoder`` names the ``.rknn`` image encoder of a
vision-language model (a path relative to the registry file's directory), overriding the pairing
by file names (see :mod:`rkllm_core.models.registry`). ``vision`` holds the family (``family``)
and overrides of its facts (``image_size``, ``tokens_per_image``, ``embed_width``, ``fill``,
``mean``, ``std``, ``img_start``, ``img_end``, ``img_content``, ``multi_image_abi12``; see
:func:`rkllm_core.vision.families.vision_family`); it is checked when the file is read, and an
unknown family without a complete set of facts is an error (the rest of the entry applies).
Sampling values and the two limits must be what
:class:`~rkllm_core.params.SamplingParams` and
:class:`~rkllm_core.params.InitParams` accept (the same checks run), so a
registry file can never hold a value the runtime would refuse.

Unknown keys are logged as warnings. A value of the wrong type or out of range
is left out alone (the rest of its entry, aliases included, still applies); an
entry that is not a table, or a file that is not valid TOML, is left out as a
whole. :func:`load_registry_file` raises the first such problem as an
:class:`~rkllm_core.errors.InvalidParameterError`; the registry reads files
leniently, keeping every valid value. How entries are matched to model files
is described in :mod:`rkllm_core.models.registry`.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final, get_args, get_type_hints

from ..errors import InvalidParameterError
from ..filenames import MODEL_KINDS, ModelKind
from ..params import SAMPLING_FIELDS, SAMPLING_POLICIES, InitParams, SamplingParams, SamplingPolicy, check_text

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
        sampling: the sampling settings (temperature, top_p, top_k, the penalties, mirostat);
            unset ones are None.
        max_new_tokens: generation limit (-1 for none).
        system_prompt: default system prompt.
        max_context_len: context length to initialise the model with.
        n_batch: slots of a batched instance (experimental; see the batching docs): up to
            ``n_batch`` concurrent requests share one run; 1 turns batching off for the model.
        chat_template: ``(system, prefix, postfix)`` strings for
            ``rkllm_set_chat_template``.
        kind: what the model is for, overriding its file name.
        sampling_policy: how the 1.2 runtime serves a request's sampling (see
            :data:`~rkllm_core.params.SamplingPolicy`), overriding the manager's.
        embedding: overrides of the embedding recipe, as ``(field, value)`` pairs.
        reranker: overrides of the reranking recipe, as ``(field, value)`` pairs.
        vision_encoder: the image encoder file (absolute: resolved against the registry file's
            directory), overriding the pairing by file names.
        vision: the vision family (``family``) and overrides of its facts, as ``(field, value)`` pairs.
    """

    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int | None = None
    system_prompt: str | None = None
    max_context_len: int | None = None
    n_batch: int | None = None
    chat_template: tuple[str, str, str] | None = None
    kind: ModelKind | None = None
    sampling_policy: SamplingPolicy | None = None
    embedding: tuple[tuple[str, Any], ...] | None = None
    reranker: tuple[tuple[str, Any], ...] | None = None
    vision_encoder: str | None = None
    vision: tuple[tuple[str, Any], ...] | None = None

    @property
    def vision_overrides(self) -> dict[str, Any]:
        """The ``vision`` table without its ``family``: overrides of the family's facts."""
        return {k: v for k, v in self.vision or () if k != "family"}

    def as_dict(self) -> dict[str, object]:
        """The settings that are set, named as in the registry file.

        Returns:
            A mapping of setting name to value (each sampling setting under its own
            name), without the unset (None) ones.
        """
        values: dict[str, object] = {k: v for k, v in self.sampling.as_dict().items() if v is not None}
        values.update({name: getattr(self, name) for name in _OTHER_FIELDS if getattr(self, name) is not None})
        return values

    def merged(self, other: ModelDefaults) -> ModelDefaults:
        """These defaults with the settings they leave unset taken from ``other``.

        Args:
            other: lower-priority defaults.

        Returns:
            The merged defaults.
        """
        changes: dict[str, Any] = {
            name: getattr(other, name)
            for name in _OTHER_FIELDS
            if getattr(self, name) is None and getattr(other, name) is not None
        }
        return replace(self, sampling=other.sampling.merged(self.sampling), **changes)


_OTHER_FIELDS: Final = tuple(f.name for f in fields(ModelDefaults) if f.name != "sampling")


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

# Float settings: an int written in the file (``temperature = 1``) is stored as a float.
_FLOAT_FIELDS: Final = frozenset(
    name for name, hint in get_type_hints(SamplingParams).items() if float in get_args(hint)
)
_INIT_FIELDS: Final = ("max_new_tokens", "max_context_len", "n_batch")
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


def _sampling_value(where: str, name: str, value: Any) -> Any:
    try:
        SamplingParams(**{name: value})
    except (InvalidParameterError, TypeError) as exc:
        raise InvalidParameterError(f"{where}: {exc}") from exc
    return float(value) if name in _FLOAT_FIELDS else value


def _init_value(where: str, name: str, value: Any) -> Any:
    try:
        InitParams(**{name: value})
    except (InvalidParameterError, TypeError) as exc:
        raise InvalidParameterError(f"{where}: {exc}") from exc
    return value


def _system_prompt(where: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidParameterError(f"{where}: system_prompt must be a string, got {value!r}")
    return check_text(value, f"{where}: system_prompt")


def _chat_template(where: str, name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, dict) or set(value) - set(_TEMPLATE_KEYS):
        raise InvalidParameterError(
            f"{where}: chat_template must be a table of system, prefix and postfix, got {value!r}"
        )
    parts = tuple(value.get(part, "") for part in _TEMPLATE_KEYS)
    if not all(isinstance(p, str) for p in parts):
        raise InvalidParameterError(f"{where}: chat_template values must be strings, got {value!r}")
    for part, text in zip(_TEMPLATE_KEYS, parts, strict=True):
        check_text(text, f"{where}: chat_template.{part}")
    return parts


def _kind(where: str, name: str, value: object) -> object:
    if value not in MODEL_KINDS:
        raise InvalidParameterError(f"{where}: kind must be one of {', '.join(MODEL_KINDS)}, got {value!r}")
    return value


def _sampling_policy(where: str, name: str, value: object) -> object:
    if value not in SAMPLING_POLICIES:
        raise InvalidParameterError(
            f"{where}: sampling_policy must be one of {', '.join(SAMPLING_POLICIES)}, got {value!r}"
        )
    return value


def _vision_encoder(where: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameterError(f"{where}: vision_encoder must be a file name or path, got {value!r}")
    return check_text(value.strip(), f"{where}: vision_encoder")


def _vision(where: str, name: str, value: object) -> tuple[tuple[str, Any], ...]:
    """Check a ``vision`` table with the family facts it overrides; stored as ``(field, value)`` pairs."""
    from ..vision.families import FAMILIES, vision_family  # the vision package only when a file uses it

    if not isinstance(value, dict) or not value:
        raise InvalidParameterError(f"{where}: vision must be a table (family = ..., overrides), got {value!r}")
    family = value.get("family")
    if family is not None and (not isinstance(family, str) or not family.strip()):
        raise InvalidParameterError(f"{where}: vision.family must be a family name, got {family!r}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k != "family"}
    try:
        # Without a family the model's file name gives it: only the overrides can be checked here.
        vision_family(family if family is not None else next(iter(FAMILIES)), overrides, model=where)
    except (InvalidParameterError, TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{where}: vision: {exc}") from exc
    pairs = (("family", family.strip().lower()),) if family is not None else ()
    return pairs + tuple(overrides.items())


def _aliases(where: str, name: str, value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(a, str) and a.strip() for a in items):
        raise InvalidParameterError(f"{where}: aliases must be a list of non-empty strings, got {value!r}")
    return tuple(dict.fromkeys(str(a).strip() for a in items))


# How each key of an entry is checked and stored: (where, key, value) -> the value to keep, or
# InvalidParameterError naming the file, the entry and the key. Sampling values and limits are
# checked by SamplingParams and InitParams, so a file accepts exactly what the runtime does.
_Check = Callable[[str, str, object], Any]
_CHECKS: Final[dict[str, _Check]] = {
    **dict.fromkeys(SAMPLING_FIELDS, _sampling_value),
    **dict.fromkeys(_INIT_FIELDS, _init_value),
    "system_prompt": _system_prompt,
    "chat_template": _chat_template,
    "kind": _kind,
    "sampling_policy": _sampling_policy,
    "embedding": _parse_recipe,
    "reranker": _parse_recipe,
    "vision_encoder": _vision_encoder,
    "vision": _vision,
    "aliases": _aliases,
}


def _parse_entry(key: str, table: object, source: Path) -> tuple[RegistryEntry, list[InvalidParameterError]]:
    """Validate one ``[models."<key>"]`` table, value by value.

    Returns:
        The entry with every valid value, and one error per value left out.

    Raises:
        InvalidParameterError: ``table`` is not a table (nothing of it is kept).
    """
    where = f'{source}: [models."{key}"]'
    if not isinstance(table, dict):
        raise InvalidParameterError(f"{where} must be a table, got {table!r}")
    values: dict[str, Any] = {}
    errors: list[InvalidParameterError] = []
    for name, value in table.items():
        check = _CHECKS.get(name)
        if check is None:
            logger.warning("%s: unknown key %r ignored", where, name)
            continue
        try:
            values[name] = check(where, name, value)
        except InvalidParameterError as exc:
            errors.append(exc)
    aliases: tuple[str, ...] = values.pop("aliases", ())
    if "vision_encoder" in values:
        values["vision_encoder"] = str(source.parent / Path(values["vision_encoder"]).expanduser())
    sampling = SamplingParams(**{name: values.pop(name) for name in SAMPLING_FIELDS if name in values})
    defaults = ModelDefaults(sampling=sampling, **values)
    return RegistryEntry(key=key.strip().lower(), aliases=aliases, defaults=defaults, source=source), errors


def _read_registry_file(path: Path) -> tuple[list[RegistryEntry], list[InvalidParameterError]]:
    """Parse a registry file leniently: a bad value or entry is reported and left out, the rest kept."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [InvalidParameterError(f"{path}: cannot read registry file: {exc}")]
    return _parse_registry_bytes(path, data)


def _parse_registry_bytes(path: Path, data: bytes) -> tuple[list[RegistryEntry], list[InvalidParameterError]]:
    """Parse the content ``data`` of the registry file ``path`` leniently (see :func:`_read_registry_file`)."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
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
            entry, entry_errors = _parse_entry(str(key), table, path)
        except InvalidParameterError as exc:
            errors.append(exc)
            continue
        entries.append(entry)
        errors += entry_errors
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
