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
:mod:`rkllm_core.filenames`), e.g.
``Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx16384-rk3588.rkllm`` is
``qwen3-0.6b``. When two files share a friendly name each gets a visible
suffix (``qwen3-0.6b-w8a8`` / ``qwen3-0.6b-w4a16``) and the bare name
resolves only if exactly one of them was built for this board's platform
(see :func:`rkllm_core.board.platform_matches`); otherwise looking it up
raises :class:`~rkllm_core.errors.ModelNotFoundError` listing the candidates.
A model can also be looked up by an alias, by its file name (with or without
``.rkllm``), by a loose form of any of those (case, ``-``, ``_``, ``.`` and
spaces ignored, except between two digits: ``Qwen3 0.6B`` finds
``qwen3-0.6b`` but ``qwen3-06b`` does not) and by a path to the file.

Registry files: an optional ``rkllm-models.toml`` in a model directory adds
aliases and per-model defaults (its format is described in
:mod:`rkllm_core.models.registry_file`). Keys are matched case-insensitively
against the models found under the file's own directory first and against all
models when none matches there. A key that matches several models (an
ambiguous friendly name) sets the defaults of all of them but its aliases are
refused. When several entries set the same field for one model, the first
wins (directories in search order, entries in file order). An invalid value
(alone: the rest of its entry still applies), an entry that is not a table, or a
file that is not valid TOML, is ignored, logged as an error and listed
in :attr:`ModelRegistry.errors` as an
:class:`~rkllm_core.errors.InvalidParameterError`. An alias that is already
another model's name, file name or alias is refused with a warning; an alias
may claim an ambiguous friendly name for one of the models that share it.

Image encoders: a ``.rknn`` file in the same folder as a ``.rkllm`` is paired with it by the
model words of the two names, or when it is the only pair in the folder (the rules, and which of
several encoders is taken, are in :mod:`rkllm_core.models.pairing`); a registry file's
``vision_encoder`` overrides the pairing. A model with an encoder is of kind ``vision``
(:attr:`ModelInfo.encoder`, :attr:`ModelInfo.vision_family`); a ``vision`` model without one
serves text only (:attr:`ModelInfo.text_only`, and a warning once per file).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from ..board import detect_board_platform, platform_matches
from ..errors import (
    InvalidParameterError,
    ModelFileError,
    ModelKindError,
    ModelNotFoundError,
    NoModelsFoundError,
)
from ..filenames import (
    _SUFFIX,
    ModelFacts,
    ModelKind,
    _disambiguate,
    _strip_suffix,
    friendly_name,
    parse_model_filename,
)
from .pairing import ENCODER_SUFFIX, EncoderFile, list_encoders, pick_encoder
from .registry_file import REGISTRY_FILENAME, ModelDefaults, RegistryEntry, _parse_registry_bytes

__all__ = [
    "CHAT_KINDS",
    "DEFAULT_CONTEXT_SIZE",
    "ENV_MODEL_DIR",
    "ModelInfo",
    "ModelRegistry",
    "default_model_dirs",
    "require_kind",
]

logger = logging.getLogger(__name__)

#: Context size assumed when neither the file name nor the registry file gives one.
DEFAULT_CONTEXT_SIZE: Final = 4096
#: Environment variable listing model directories (``os.pathsep``-separated).
ENV_MODEL_DIR: Final = "RKLLM_MODEL_DIR"

#: The kinds a chat class serves: chat models, and the language half of a
#: vision-language model (text-only until an image encoder is attached).
CHAT_KINDS: Final[tuple[ModelKind, ...]] = ("chat", "vision")
# What serves each kind, for the message of a refusal.
_SERVED_BY: Final[dict[str, str]] = {
    "chat": "langchain_rkllm.ChatRKLLM, llamaindex_rkllm.RKLLM or rkllm_core.chat.ChatEngine",
    "vision": "langchain_rkllm.ChatRKLLM, llamaindex_rkllm.RKLLM or rkllm_core.chat.ChatEngine",
    "embedding": "langchain_rkllm.RKLLMEmbeddings, llamaindex_rkllm.RKLLMEmbedding or rkllm_core.embed.EmbeddingEngine",
    "reranker": "langchain_rkllm.RKLLMRerank, llamaindex_rkllm.RKLLMRerank or rkllm_core.embed.EmbeddingEngine.rerank",
}

# A directory whose mtime is this close to the scan is re-scanned at the next
# refresh: many file systems stamp mtimes with a coarse clock (a kernel tick;
# two seconds on FAT), so a file created just after a scan may leave the
# directory's mtime unchanged.
_RACY_NS = 2_000_000_000


# --------------------------------------------------------------------------
# Model records
# --------------------------------------------------------------------------


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
        encoder: the ``.rknn`` image encoder paired with the model (see "Image encoders" in
            :mod:`rkllm_core.models.registry`), or None.
        encoder_size: the encoder file's size in bytes (0 without one, or when it is missing).
        vision_family: the vision-language family (``qwen3-vl``): the registry file's
            ``vision.family``, else the family key its file name belongs to; None for text models
            and unrecognised names.
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
    encoder: Path | None = None
    encoder_size: int = 0
    vision_family: str | None = None

    @property
    def kind(self) -> ModelKind:
        """What the model is for: the registry file's ``kind``, else ``vision`` with an encoder, else its name's."""
        return self.defaults.kind or ("vision" if self.encoder is not None else self.facts.kind)

    @property
    def text_only(self) -> bool:
        """True for a ``vision`` model without an image encoder: it serves text, and refuses images."""
        return self.kind == "vision" and self.encoder is None

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


def require_kind(info: ModelInfo, accepted: Sequence[str], user: str) -> None:
    """Refuse a model whose kind ``user`` does not serve, before anything is loaded.

    Args:
        info: the model.
        accepted: the kinds ``user`` serves.
        user: who asks, as the subject of a plural verb (``"the chat classes"``).

    Raises:
        ModelKindError: ``info.kind`` is not in ``accepted``; the message
            names the classes that serve that kind.
    """
    if info.kind in accepted:
        return
    article = "an" if info.kind[0] in "aeiou" else "a"
    raise ModelKindError(
        f"{info.name!r} ({info.filename}) is {article} {info.kind} model; {user} only serve "
        f"{' and '.join(accepted)} models. For {info.kind} models use {_SERVED_BY[info.kind]}. "
        f'If the file name misleads, set kind = "..." for this model in {REGISTRY_FILENAME}.',
        model=info.name,
        kind=info.kind,
        accepted=accepted,
    )


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


def _scan(dirs: Sequence[Path]) -> tuple[list[tuple[Path, str, Path, int, Path]], list[Path]]:
    """List the model files under ``dirs`` and one level below.

    Returns:
        ``(resolved path, file name, model dir, size, folder)`` per distinct file in
        discovery order, and the subdirectories that were listed. The file
        name is the directory entry's (a symlink's own name, not its target's);
        the folder is the directory the entry is in.
    """
    found: list[tuple[Path, str, Path, int, Path]] = []
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
            found.append((resolved, entry.name, home, size, Path(entry.path).parent))

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
    folder: Path  # the directory the entry is in (its encoders are looked for there)


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
    found: Sequence[_Found],
    names: Sequence[str],
    entries: Sequence[RegistryEntry],
    warn: Callable[..., None] = logger.warning,
) -> tuple[list[ModelDefaults], list[tuple[str, ...]]]:
    """Match registry entries to files; returns each file's defaults and accepted aliases.

    Problems (an entry that matches nothing, a refused alias) are reported through ``warn``,
    called like :meth:`logging.Logger.warning`.
    """
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
            warn('%s: [models."%s"] matches no model file', entry.source, entry.key)
            continue
        for i in matches:
            defaults[i] = defaults[i].merged(entry.defaults)
        if entry.aliases and len(matches) > 1:
            warn(
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
            warn(
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


def _pair_encoders(
    found: Sequence[_Found], defaults: Sequence[ModelDefaults], errors: list[InvalidParameterError]
) -> list[EncoderFile | Path | None]:
    """Each file's image encoder: the registry file's ``vision_encoder``, else by :mod:`.pairing`'s rules.

    A ``vision_encoder`` that does not exist is kept (loading the model then fails with a clear
    error) and reported in ``errors``.
    """
    folders: dict[Path, list[EncoderFile]] = {}
    models_in = Counter(item.folder for item in found)
    paired: list[EncoderFile | Path | None] = []
    for item, d in zip(found, defaults, strict=True):
        if d.vision_encoder is not None:
            path = Path(d.vision_encoder)
            if not path.is_file():
                errors.append(
                    InvalidParameterError(f"{item.filename}: vision_encoder {d.vision_encoder!r} is not a file")
                )
            paired.append(path)
            continue
        if item.folder not in folders:
            folders[item.folder] = list_encoders(item.folder)
        paired.append(pick_encoder(item.facts, d.kind, folders[item.folder], models_in[item.folder]))
    return paired


def _with_vision(info: ModelInfo, encoder: EncoderFile | Path | None) -> ModelInfo:
    """``info`` with its encoder and vision family set."""
    if isinstance(encoder, Path):
        given = encoder
        try:
            encoder = EncoderFile(given.resolve(), given.name, given.stat().st_size, info.facts)
        except OSError:
            encoder = EncoderFile(given, given.name, 0, info.facts)
    vision = dict(info.defaults.vision or ())
    family = vision.get("family")
    if family is None and (encoder is not None or info.kind == "vision"):
        from ..vision.families import family_key  # the vision package only for vision models

        family = family_key(info.facts.family)
    if encoder is None and family is None:
        return info
    return replace(
        info,
        encoder=encoder.path if encoder is not None else None,
        encoder_size=encoder.size if encoder is not None else 0,
        vision_family=family,
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
        # Each registry file's content and what it parsed to: an unchanged file is not parsed (nor
        # its problems logged) again; the problems said since a registry file last changed.
        self._parsed: dict[Path, tuple[bytes | str, list[RegistryEntry], list[InvalidParameterError]]] = {}
        self._said: set[str] = set()
        # Models looked up by a path outside the model directories, by path; their names resolve
        # to them from then on (see get()).
        self._outside: dict[Path, ModelInfo] = {}
        self._text_only_said: set[Path] = set()  # vision models said to serve text only

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
        outside the model directories. A model found by a path outside the
        directories joins the registry: its name (the friendly name, with a
        ``-2``-style suffix when a model in the directories has it) finds that
        file from then on, so the name can be passed on (to a manager, a chat
        engine). A miss re-scans changed directories once before failing.

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
        if hit is None:
            hit = self._snapshot.loose.get(_normalise(key))
        if hit is None:
            hit = next((info for info in self._outside.values() if info.name.lower() == key), None)
        return hit

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
        earlier = self._outside.get(path)
        if earlier is not None and earlier.file_size == size:
            return earlier
        facts = parse_model_filename(filename)
        taken = {info.name for info in self._snapshot.models} | {
            info.name for p, info in self._outside.items() if p != path
        }
        name = friendly_name(facts)
        unique, counter = name, 2
        while unique in taken or unique.lower() in self._snapshot.index:
            unique, counter = f"{name}-{counter}", counter + 1
        info = _make_info(unique, path, filename, facts, size)
        info = _with_vision(info, pick_encoder(facts, None, list_encoders(path.parent), 1))
        self._outside[path] = info
        return info

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
        found = [
            _Found(path, name, home, size, parse_model_filename(name), folder)
            for path, name, home, size, folder in files
        ]
        self._snapshot = self._build(found, registry_files)
        self._loaded = True
        self._generation += 1
        logger.debug("scanned %s: %d models", ", ".join(map(str, self._dirs)), len(found))

    def _read_registry_files(
        self, registry_files: list[Path]
    ) -> tuple[list[RegistryEntry], list[InvalidParameterError]]:
        """The registry files' entries and problems; a problem is logged once per change of its file."""
        entries: list[RegistryEntry] = []
        errors: list[InvalidParameterError] = []
        for registry_file in registry_files:
            if not registry_file.is_file():
                self._parsed.pop(registry_file, None)
                continue
            try:
                content: bytes | str = registry_file.read_bytes()
            except OSError as exc:
                content = f"{registry_file}: cannot read registry file: {exc}"
            cached = self._parsed.get(registry_file)
            if cached is None or cached[0] != content:
                self._said.clear()  # a file changed: what was said about the files may be said again
                if isinstance(content, str):
                    cached = (content, [], [InvalidParameterError(content)])
                else:
                    cached = (content, *_parse_registry_bytes(registry_file, content))
                self._parsed[registry_file] = cached
                for error in cached[2]:
                    logger.error("%s (ignored)", error)
            entries += cached[1]
            errors += cached[2]
        return entries, errors

    def _warn_once(self, message: str, *args: object) -> None:
        """Log a warning about the registry files unless it was logged since they last changed."""
        text = message % args if args else message
        if text not in self._said:
            self._said.add(text)
            logger.warning("%s", text)

    def _build(self, found: list[_Found], registry_files: list[Path]) -> _Snapshot:
        names, shared = _assign_names(found)
        entries, errors = self._read_registry_files(registry_files)
        defaults, aliases = _apply_registry(found, names, entries, self._warn_once)
        encoders = _pair_encoders(found, defaults, errors)
        infos = [
            _with_vision(
                _make_info(names[i], item.path, item.filename, item.facts, item.size, aliases[i], defaults[i]),
                encoders[i],
            )
            for i, item in enumerate(found)
        ]
        self._say_text_only(infos)

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

    def _say_text_only(self, infos: Sequence[ModelInfo]) -> None:
        """Log once per file that a vision model without an image encoder serves text only."""
        for info in infos:
            if info.text_only and info.path not in self._text_only_said:
                self._text_only_said.add(info.path)
                logger.warning(
                    "%s is a vision-language model without an image encoder (%s file) beside it: it serves text "
                    'only; put its encoder in %s or name it with vision_encoder = "..." in %s',
                    info.name,
                    ENCODER_SUFFIX,
                    info.path.parent,
                    self._registry_filename,
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
