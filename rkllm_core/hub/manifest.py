"""The small record each pulled model keeps beside its files: where it came from, and what was checked.

``rkllm pull`` puts a model in its own folder under a model directory and
writes :data:`MANIFEST_NAME` there last, a JSON object::

    {"format": 1, "repo_id": "OWNER/REPO", "revision": "main", "commit": "<40 hex>",
     "endpoint": "https://huggingface.co", "model": "FILE.rkllm", "pulled_at": "<ISO 8601>",
     "files": [{"repo_path": "...", "local_name": "...", "size": 123, "sha256": "...", "blob_id": "..."}]}

The name is hidden, so the registry never mistakes it for a model. This module
is standard library only: ``rkllm models`` reads it without ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["MANIFEST_NAME", "Manifest", "ManifestFile", "read_manifest", "source_of", "write_manifest"]

#: The manifest's file name inside a pulled model's folder.
MANIFEST_NAME: Final = ".rkllm-pull.json"
_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a pulled model.

    Attributes:
        repo_path: the file's path inside the repository.
        local_name: its name in the model's folder.
        size: its size in bytes.
        sha256: the Hub's sha256 of it (LFS files), checked before it became visible.
        blob_id: the Hub's git blob id of it, checked for files kept outside LFS.
    """

    repo_path: str
    local_name: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """Where a pulled model came from.

    Attributes:
        repo_id: the repository, ``OWNER/REPO``.
        revision: the revision asked for (``main`` unless one was given).
        commit: the commit the files were taken from.
        endpoint: the Hub's address.
        model: the local name of the ``.rkllm`` file.
        files: every file pulled, the model included.
        pulled_at: when, ISO 8601 in UTC.
    """

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    model: str
    files: tuple[ManifestFile, ...] = field(default_factory=tuple)
    pulled_at: str = ""

    @property
    def source(self) -> str:
        """A short origin: ``hf.co/OWNER/REPO@<commit8>`` (the host itself for another endpoint)."""
        host = self.endpoint.split("://", 1)[-1].rstrip("/")
        host = "hf.co" if host in ("huggingface.co", "www.huggingface.co", "hf.co") else host
        return f"{host}/{self.repo_id}@{self.commit[:8]}"

    def file(self, local_name: str) -> ManifestFile | None:
        """The record of the file with this local name, if the manifest lists it."""
        return next((f for f in self.files if f.local_name == local_name), None)


def _from_json(data: dict[str, Any]) -> Manifest:
    files = tuple(
        ManifestFile(
            repo_path=str(f["repo_path"]),
            local_name=str(f["local_name"]),
            size=int(f["size"]),
            sha256=f.get("sha256"),
            blob_id=f.get("blob_id"),
        )
        for f in data["files"]
    )
    return Manifest(
        repo_id=str(data["repo_id"]),
        revision=str(data["revision"]),
        commit=str(data["commit"]),
        endpoint=str(data["endpoint"]),
        model=str(data["model"]),
        files=files,
        pulled_at=str(data.get("pulled_at", "")),
    )


def read_manifest(folder: str | os.PathLike[str]) -> Manifest | None:
    """The manifest of the pulled model in ``folder``, or None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
        return _from_json(data) if data.get("format") == _FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest`` into ``folder`` atomically (a hidden temporary file, then a rename).

    Returns:
        The manifest's path.
    """
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(f"{MANIFEST_NAME}.{os.getpid()}.tmp")
    data = {"format": _FORMAT, **asdict(manifest)}
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def source_of(model_path: str | os.PathLike[str]) -> str | None:
    """Where a model file was pulled from.

    Args:
        model_path: the ``.rkllm`` file.

    Returns:
        ``hf.co/OWNER/REPO@<commit8>`` when ``rkllm pull`` brought this file,
        else None.
    """
    path = Path(model_path)
    manifest = read_manifest(path.parent)
    if manifest is None or manifest.model != path.name:
        return None
    return manifest.source
