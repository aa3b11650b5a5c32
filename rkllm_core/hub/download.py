"""Pull a model from the Hugging Face Hub into a model directory, checked before it becomes visible.

:func:`pull` reads the repository's file list with ``huggingface_hub``
(sizes, LFS sha256, git blob ids), chooses the ``.rkllm`` file and its
companions (:mod:`rkllm_core.hub.select`), downloads what is missing into a
hidden staging folder, resuming partial files with an HTTP ``Range``, checks
each file against the Hub's checksum, and only then moves the files into the
model's folder (:mod:`rkllm_core.hub.store`), the ``.rkllm`` last, and writes
the manifest (:mod:`rkllm_core.hub.manifest`). A file whose checksum does not
match is refused and its staging deleted, so a truncated or corrupt model
never reaches ``rkllm_init``. A pull whose files are all present with the
Hub's checksums downloads nothing.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` when it is first imported (``huggingface_hub.constants``);
this module imports it on the first pull, so set them before that, or pass
``endpoint=``/``token=``. In offline mode a model already pulled is reported
present and anything else is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from ..board import detect_board_platform
from ..errors import ChecksumError, PullError
from ..models.registry import default_model_dirs
from .manifest import Manifest, ManifestFile, read_manifest, write_manifest
from .refs import HubRef, parse_ref
from .select import choose_companions, choose_model_file, library_abi
from .store import find_pulled, model_folder, pull_lock, staging_folder

__all__ = ["PullProgress", "PullResult", "pull"]

_AUTO: Final = "auto"
_INSTALL_HINT: Final = 'rkllm pull needs huggingface_hub: pip install -e ".[hub]" in your boardllm checkout'
_PART: Final = ".part"


@dataclass(frozen=True, slots=True)
class PullProgress:
    """One step of a pull, for a progress display or Ollama's ``/api/pull`` stream.

    Attributes:
        status: what is happening: ``pulling manifest``, ``pulling <file>``,
            ``verifying sha256 digest``, ``writing manifest``, ``up to date``, ``success``.
        file: the file concerned (its path inside the repository), if any.
        total: the file's size in bytes, while pulling it.
        completed: the bytes of it on disk so far, while pulling it.
    """

    status: str
    file: str | None = None
    total: int | None = None
    completed: int | None = None


@dataclass(frozen=True, slots=True)
class PullResult:
    """What a pull left on disk.

    Attributes:
        repo_id: the repository.
        commit: the commit the files come from.
        model_path: the ``.rkllm`` file.
        files: every file of the model's folder that the pull manages, the model included.
        downloaded: the files (paths inside the repository) this pull fetched; empty when it was up to date.
        offline: True when offline mode reported an already-pulled model without asking the Hub.
        source: where it came from, ``hf.co/OWNER/REPO@<commit8>``.
    """

    repo_id: str
    commit: str
    model_path: Path
    files: tuple[Path, ...]
    downloaded: tuple[str, ...]
    offline: bool
    source: str

    @property
    def up_to_date(self) -> bool:
        """Whether nothing had to be downloaded."""
        return not self.downloaded


@dataclass(frozen=True, slots=True)
class _Remote:
    repo_path: str
    local_name: str
    size: int
    sha256: str | None
    blob_id: str | None


@dataclass(frozen=True, slots=True)
class _Hub:
    """The parts of ``huggingface_hub`` a pull uses, with the endpoint and token settled."""

    module: ModuleType
    endpoint: str
    token: str | None

    @property
    def offline(self) -> bool:
        return bool(self.module.constants.HF_HUB_OFFLINE)


_Report = Callable[[PullProgress], None]


def _connect(endpoint: str | None, token: str | None) -> _Hub:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.file_download
        import huggingface_hub.utils
    except ImportError as exc:
        raise PullError(_INSTALL_HINT) from exc
    # HF_ENDPOINT as it is now: huggingface_hub read it once, when it was first imported
    chosen = (endpoint or os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT).rstrip("/")
    return _Hub(huggingface_hub, chosen, token)


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)


@contextmanager
def _hub_errors(hub: _Hub, ref: HubRef, staging: Path | None = None) -> Iterator[None]:
    """Turn ``huggingface_hub``, network and disk failures into :class:`PullError` with a clear message."""
    errors = hub.module.errors
    where = f"on {hub.endpoint}"
    resume = f"; the partial download is kept in {staging}, run the same command to resume" if staging else ""
    try:
        yield
    except errors.GatedRepoError as exc:
        raise PullError(f"{ref.repo_id} {where} is gated: accept its terms on the Hub and set HF_TOKEN") from exc
    except errors.RepositoryNotFoundError as exc:
        raise PullError(
            f"no repository {ref.repo_id} {where} (check the spelling; a private repository needs HF_TOKEN)"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise PullError(f"{ref.repo_id} {where} has no revision {ref.revision or 'main'!r}") from exc
    except errors.EntryNotFoundError as exc:
        raise PullError(f"a file of {ref.repo_id} vanished from {hub.endpoint} while pulling; try again") from exc
    except errors.OfflineModeIsEnabled as exc:
        raise PullError(f"offline mode (HF_HUB_OFFLINE=1) and {ref} was not pulled before") from exc
    except errors.HfHubHTTPError as exc:
        raise PullError(f"the Hub {where} refused: {str(exc).splitlines()[0]}{resume}") from exc
    except _network_errors() as exc:
        raise PullError(f"cannot reach {hub.endpoint}: {exc}{resume} (HF_ENDPOINT sets the address)") from exc
    except OSError as exc:
        if isinstance(exc, PullError):
            raise
        raise PullError(f"cannot write the model: {exc}{resume}") from exc


def _plan(hub: _Hub, ref: HubRef, platform: str | None) -> tuple[str, list[_Remote]]:
    """The commit and the files to pull, the ``.rkllm`` first."""
    api = hub.module.HfApi(endpoint=hub.endpoint, token=hub.token)
    info = api.model_info(ref.repo_id, revision=ref.revision or "main", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or ()}
    model = choose_model_file(ref, list(siblings), board=platform, abi=library_abi())
    wanted = [model, *choose_companions(model, list(siblings), board=platform)]
    plan = []
    for path in wanted:
        sibling = siblings[path]
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        if size is None or (path == model and lfs is None and sibling.blob_id is None):
            raise PullError(f"{hub.endpoint} gives no size or checksum for {ref.repo_id}/{path}; it cannot be checked")
        name = path.rsplit("/", 1)[-1]
        plan.append(_Remote(path, name, int(size), lfs.sha256 if lfs is not None else None, sibling.blob_id))
    return str(info.sha or ref.revision or "main"), plan


def _present(folder: Path, manifest: Manifest | None, item: _Remote) -> bool:
    """Whether ``item`` is already in ``folder`` with the Hub's checksum (as the manifest recorded it)."""
    known = manifest.file(item.local_name) if manifest is not None else None
    if known is None or known.size != item.size:
        return False
    same = (known.sha256 == item.sha256) if item.sha256 else (known.blob_id == item.blob_id)
    try:
        return same and (folder / item.local_name).stat().st_size == item.size
    except OSError:
        return False


def _bar_class(hub: _Hub, item: _Remote, report: _Report, show: bool) -> type[Any]:
    """A tqdm class for ``http_get`` that also reports progress; its bar shows only on a terminal."""
    base = hub.module.utils.tqdm

    class _Bar(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = not (show and sys.stderr.isatty())
            self._done = int(kwargs.get("initial") or 0)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            report(PullProgress(f"pulling {item.local_name}", item.repo_path, item.size, self._done))
            return super().update(n)  # type: ignore[no-any-return]

    return _Bar


def _digest(path: Path, algorithm: str, size: int) -> str:
    h = hashlib.new(algorithm)
    if algorithm == "sha1":  # a git blob id: sha1 over "blob <size>\0" then the content
        h.update(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(part: Path, item: _Remote, staging: Path, report: _Report) -> None:
    """Check a downloaded file against the Hub's checksum; on a mismatch delete the staging and refuse."""
    report(PullProgress("verifying sha256 digest", item.repo_path))
    algorithm, expected = ("sha256", item.sha256) if item.sha256 else ("sha1", item.blob_id)
    actual = _digest(part, algorithm, item.size) if expected else ""
    if expected and actual != expected.lower():
        shutil.rmtree(staging, ignore_errors=True)
        raise ChecksumError(
            f"{item.repo_path} does not match the Hub's {algorithm} (expected {expected}, got {actual}); "
            "it was deleted and nothing was installed. Run the pull again; if it fails again, report it "
            "to the repository's owner",
            filename=item.repo_path,
            expected=expected,
            actual=actual,
        )
    part.replace(staging / item.local_name)


def _fetch(hub: _Hub, commit: str, repo_id: str, item: _Remote, staging: Path, bar: type[Any]) -> Path:
    """Download ``item`` into ``staging``, continuing a partial file from where it stopped."""
    part = staging / f"{item.local_name}{_PART}"
    resume = part.stat().st_size if part.exists() else 0
    if resume > item.size:
        part.unlink()
        resume = 0
    url = hub.module.hf_hub_url(repo_id, item.repo_path, revision=commit, endpoint=hub.endpoint)
    headers = hub.module.utils.build_hf_headers(token=hub.token)
    with part.open("ab") as out:
        hub.module.file_download.http_get(
            url,
            out,
            resume_size=resume,
            headers=headers,
            expected_size=item.size,
            displayed_filename=item.local_name,
            tqdm_class=bar,
        )
    return part


def _check_space(staging: Path, todo: list[_Remote]) -> None:
    parts = [staging / f"{i.local_name}{_PART}" for i in todo]
    have = sum(p.stat().st_size for p in parts if p.exists())
    need = sum(i.size for i in todo) - have
    free = shutil.disk_usage(staging).free
    if need > free:
        raise PullError(
            f"not enough disk space in {staging.parent}: the model needs {need / 2**20:.0f} MiB more, "
            f"{free / 2**20:.0f} MiB are free"
        )


def _install(folder: Path, staging: Path, plan: list[_Remote], manifest: Manifest, old: Manifest | None) -> None:
    """Move the checked files into the model's folder, the ``.rkllm`` last, then write the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in [*plan[1:], plan[0]]:
        staged = staging / item.local_name
        if staged.exists():
            staged.replace(folder / item.local_name)
    write_manifest(folder, manifest)
    current = {i.local_name for i in plan}
    for stale in old.files if old is not None else ():
        if stale.local_name not in current:
            (folder / stale.local_name).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _offline(ref: HubRef, dest: Path, report: _Report) -> PullResult:
    found = find_pulled(dest, ref)
    if not found:
        raise PullError(f"offline mode (HF_HUB_OFFLINE=1) and {ref} was not pulled into {dest} before")
    if len(found) > 1:
        names = "\n".join(f"  {folder}" for folder, _ in found)
        raise PullError(f"offline mode: several models from {ref} are in {dest}; name the file:\n{names}")
    folder, manifest = found[0]
    report(PullProgress("up to date"))
    return PullResult(
        repo_id=manifest.repo_id,
        commit=manifest.commit,
        model_path=folder / manifest.model,
        files=tuple(folder / f.local_name for f in manifest.files),
        downloaded=(),
        offline=True,
        source=manifest.source,
    )


def _download(hub: _Hub, ref: HubRef, commit: str, plan: list[_Remote], folder: Path, show: bool,
              report: _Report) -> list[_Remote]:  # fmt: skip
    """Fetch and check the files of ``plan`` that ``folder`` lacks; returns those fetched."""
    old = read_manifest(folder)
    todo = [item for item in plan if not _present(folder, old, item)]
    if not todo:
        return todo
    staging = staging_folder(folder)
    staging.mkdir(parents=True, exist_ok=True)
    with _hub_errors(hub, ref, staging):
        _check_space(staging, todo)
        for item in todo:
            report(PullProgress(f"pulling {item.local_name}", item.repo_path, item.size, 0))
            part = _fetch(hub, commit, ref.repo_id, item, staging, _bar_class(hub, item, report, show))
            _verify(part, item, staging, report)
    return todo


def pull(
    ref: str | HubRef,
    dest_dir: str | Path | None = None,
    *,
    on_progress: Callable[[PullProgress], None] | None = None,
    progress_bar: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    platform: str | None = _AUTO,
) -> PullResult:
    """Pull a model from the Hugging Face Hub into a model directory.

    Args:
        ref: ``OWNER/REPO/FILE.rkllm``, ``hf.co/OWNER/REPO[/FILE]``, ``hf.co/OWNER/REPO:TAG``,
            ``OWNER/REPO`` (see :mod:`rkllm_core.hub.refs`), or a parsed :class:`HubRef`.
        dest_dir: the model directory; default the first of
            :func:`~rkllm_core.models.registry.default_model_dirs`. The model goes to its own folder in it.
        on_progress: called with each step, and as bytes arrive.
        progress_bar: show ``huggingface_hub``'s progress bar on stderr when it is a terminal.
        endpoint: the Hub's address; default ``HF_ENDPOINT`` or ``https://huggingface.co``.
        token: a Hub token; default ``HF_TOKEN`` or the token saved under ``HF_HOME``.
        platform: the board's SoC used to choose among files; ``"auto"`` reads the device tree,
            None means unknown.

    Returns:
        What is on disk now, and what was downloaded.

    Raises:
        PullError: ``huggingface_hub`` is missing, the repository, revision or file is unknown, the
            network or disk failed (a partial download stays hidden, for the next pull to resume), or
            offline mode has no such model.
        AmbiguousModelFileError: the repository holds several ``.rkllm`` files and nothing picks one.
        ChecksumError: a file did not match the Hub's checksum (nothing was installed).
        InvalidParameterError: ``ref`` is not a reference.
    """
    report: _Report = on_progress or (lambda _p: None)
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    dest = Path(dest_dir).expanduser().absolute() if dest_dir is not None else default_model_dirs()[0]
    hub = _connect(endpoint, token)
    if hub.offline:
        return _offline(parsed, dest, report)
    board = detect_board_platform() if platform == _AUTO else platform
    report(PullProgress("pulling manifest"))
    with _hub_errors(hub, parsed):
        dest.mkdir(parents=True, exist_ok=True)
        commit, plan = _plan(hub, parsed, board)
    return _complete_pull(hub, parsed, dest, commit, plan, progress_bar, report)


def _complete_pull(hub: _Hub, ref: HubRef, dest: Path, commit: str, plan: list[_Remote], show: bool,
                   report: _Report) -> PullResult:  # fmt: skip
    """Download what is missing, install it, and record it in the manifest."""
    folder = model_folder(dest, plan[0].repo_path)
    old = read_manifest(folder)
    if old is not None and old.repo_id.lower() != ref.repo_id.lower():
        raise PullError(f"{folder} already holds a model pulled from {old.repo_id}; rkllm rm it or use --dir")
    files = tuple(ManifestFile(i.repo_path, i.local_name, i.size, i.sha256, i.blob_id) for i in plan)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    manifest = Manifest(ref.repo_id, ref.revision or "main", commit, hub.endpoint, plan[0].local_name, files, now)
    with _hub_errors(hub, ref), pull_lock(folder):
        fetched = _download(hub, ref, commit, plan, folder, show, report)
        unchanged = old is not None and (old.commit, old.model, old.files) == (commit, manifest.model, files)
        if fetched or not unchanged:
            report(PullProgress("writing manifest"))
            _install(folder, staging_folder(folder), plan, manifest, old)
    report(PullProgress("success" if fetched else "up to date"))
    return PullResult(
        repo_id=ref.repo_id,
        commit=commit,
        model_path=folder / plan[0].local_name,
        files=tuple(folder / i.local_name for i in plan),
        downloaded=tuple(i.repo_path for i in fetched),
        offline=False,
        source=manifest.source,
    )
