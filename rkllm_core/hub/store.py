"""Where pulled models live on disk, and how they are removed.

Each pulled model has its own folder under a model directory, named after its
``.rkllm`` file without the suffix (``models/Qwen3-0.6B-w8a8-rk3588/``),
holding the model, its companion files and the manifest
(:mod:`rkllm_core.hub.manifest`). The registry finds the model one level
below the model directory; ``tokenizer.json`` beside it is the one the
embedding engine uses.

A download is staged in a hidden sibling folder (``.Qwen3-0.6B-w8a8-rk3588.partial/``)
that the registry never scans: partial files stay there for the next pull to
resume, and a file leaves it only after its checksum matched.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from ..errors import InvalidParameterError, PullError
from ..models.registry import ModelRegistry
from .manifest import Manifest, read_manifest
from .refs import HubRef

__all__ = ["find_pulled", "model_folder", "pull_lock", "remove_model", "staging_folder"]

_STAGING_SUFFIX: Final = ".partial"


def model_folder(dest: Path, model_repo_path: str) -> Path:
    """The folder a model file of a repository goes to under the model directory ``dest``."""
    stem = posixpath.basename(model_repo_path)
    if stem.lower().endswith(".rkllm"):
        stem = stem[: -len(".rkllm")]
    return dest / (stem.lstrip(".") or "model")


def staging_folder(folder: Path) -> Path:
    """The hidden folder a model's files are downloaded and checked in before they move to ``folder``."""
    return folder.with_name(f".{folder.name}{_STAGING_SUFFIX}")


def _lock_file(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def pull_lock(folder: Path) -> Iterator[None]:
    """Hold the model's lock for a pull, so two pulls of one model never write the same partial file.

    Raises:
        PullError: another pull of this model holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = _lock_file(folder)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another rkllm pull of {folder.name} is running (it holds {path})") from None
        yield


def _matches(manifest: Manifest, ref: HubRef) -> bool:
    if manifest.repo_id.lower() != ref.repo_id.lower():
        return False
    model = next((f for f in manifest.files if f.local_name == manifest.model), None)
    repo_path = model.repo_path if model else manifest.model
    if ref.filename and ref.filename.lower() not in (repo_path.lower(), posixpath.basename(repo_path).lower()):
        return False
    return not ref.tag or ref.tag.lower() in repo_path.lower()


def find_pulled(dest: Path, ref: HubRef) -> list[tuple[Path, Manifest]]:
    """The models pulled into ``dest`` from the repository (and file or tag) ``ref`` names, complete on disk.

    Returns:
        ``(folder, manifest)`` pairs in folder-name order; a folder whose files
        are missing or of the wrong size is left out.
    """
    found: list[tuple[Path, Manifest]] = []
    try:
        entries = sorted(e for e in os.listdir(dest) if not e.startswith("."))
    except OSError:
        return found
    for entry in entries:
        folder = dest / entry
        manifest = read_manifest(folder)
        if manifest is not None and _matches(manifest, ref) and _complete(folder, manifest):
            found.append((folder, manifest))
    return found


def _complete(folder: Path, manifest: Manifest) -> bool:
    for item in manifest.files:
        try:
            if (folder / item.local_name).stat().st_size != item.size:
                return False
        except OSError:
            return False
    return True


def remove_model(name: str, model_dirs: Sequence[str | Path] | None = None) -> Path:
    """Delete a pulled model's folder: the model, its companion files, its manifest, any staging and its lock.

    Args:
        name: the model's name as the registry knows it (friendly name, alias, file name or path).
        model_dirs: the model directories (see :func:`rkllm_core.models.registry.default_model_dirs`).

    Returns:
        The folder that was removed.

    Raises:
        ModelNotFoundError: no model has that name.
        InvalidParameterError: the model was not pulled by ``rkllm pull`` (it is
            not touched; the message names its path).
        PullError: the folder could not be removed.
    """
    info = ModelRegistry(model_dirs or None).get(name)
    folder = info.path.parent
    manifest = read_manifest(folder)
    if manifest is None or manifest.model != info.path.name:
        raise InvalidParameterError(
            f"{info.name!r} was not pulled by rkllm pull, so rkllm rm leaves it alone; "
            f"its file is {info.path} (delete it yourself if you mean to)"
        )
    try:
        shutil.rmtree(folder)
        shutil.rmtree(staging_folder(folder), ignore_errors=True)
        _lock_file(folder).unlink(missing_ok=True)
    except OSError as exc:
        raise PullError(f"cannot remove {folder}: {exc}") from exc
    return folder
