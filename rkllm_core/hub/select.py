"""Which files of a repository to pull: the ``.rkllm`` that suits this board, and the files that go with it.

A repository often holds one ``.rkllm`` per platform, quantisation or runtime
version. :func:`choose_model_file` takes the file the reference names; else
the only ``.rkllm`` (after a ``:TAG`` filter); else the one built for this
board's SoC (from the file name, or a folder named after the SoC) and, among
those, for the runtime library's ABI when the file name gives a runtime
version. When that still leaves several, or nothing tells them apart, it
refuses and lists the exact commands that pick each one.

:func:`choose_companions` adds the files the model needs or documents:
``tokenizer.json`` and ``tokenizer_config.json`` (exact tokenisation for
embedding and reranker models), the ``.rknn`` vision encoder of a
vision-language model, and the README and licence.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from ..board import PLATFORM_RE, platform_matches
from ..errors import AmbiguousModelFileError, PullError
from ..filenames import parse_model_filename
from .refs import HubRef

__all__ = ["choose_companions", "choose_model_file", "file_platform", "file_runtime_abi", "library_abi"]

_MODEL_SUFFIX: Final = ".rkllm"
_ENCODER_SUFFIX: Final = ".rknn"
# Companion files by lower-case name, beside the model first, then at the repository's root.
_COMPANION_NAMES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "readme.md",
    "license",
    "license.md",
    "license.txt",
)


def _listing(files: Sequence[str], limit: int = 20) -> str:
    shown = [f"  {f}" for f in files[:limit]]
    if len(files) > limit:
        shown.append(f"  ... and {len(files) - limit} more")
    return "\n".join(shown)


def file_platform(repo_path: str) -> str | None:
    """The SoC a repository file was built for: from its name, else from a folder named after the SoC."""
    platform = parse_model_filename(posixpath.basename(repo_path)).platform
    if platform:
        return platform
    for folder in reversed(repo_path.split("/")[:-1]):
        if PLATFORM_RE.match(folder.lower()):
            return folder.lower()
    return None


def file_runtime_abi(repo_path: str) -> str | None:
    """The runtime ABI (``1.2``/``1.3``) a file's name says it was converted for, if it says."""
    from ..native.library import version_to_abi

    runtime = parse_model_filename(posixpath.basename(repo_path)).runtime
    return version_to_abi(runtime.lstrip("v")) if runtime else None


def library_abi() -> str | None:
    """The ABI of the runtime library this machine would load, read from the file alone.

    Nothing is loaded: the library is found as :func:`rkllm_core.native.library.find_library`
    finds it and recognised by its git blob id or its version strings.

    Returns:
        ``1.2`` or ``1.3``, or None when there is no library or it does not tell.
    """
    from ..errors import RKLLMError
    from ..native import library

    try:
        path = library.find_library()
        known = library.KNOWN_BUILDS.get(library.git_blob_id(path))
        if known is not None:
            return library.version_to_abi(known[0])
        abi, _why = library._strings_signal(path.read_bytes())
        return abi
    except (RKLLMError, OSError):
        return None


def _pick_named(ref: HubRef, paths: Sequence[str], models: Sequence[str]) -> str:
    wanted = ref.filename or ""
    exact = [p for p in paths if p == wanted]
    loose = exact or [p for p in paths if p.lower() == wanted.lower()]
    loose = loose or [p for p in paths if posixpath.basename(p).lower() == wanted.lower()]
    if len(loose) != 1:
        known = _listing(list(models)) if models else "  (none)"
        what = "several files named" if loose else "no file"
        raise PullError(f"{ref.repo_id} has {what} {wanted!r}; its .rkllm files are:\n{known}")
    if not loose[0].lower().endswith(_MODEL_SUFFIX):
        raise PullError(f"{ref.repo_id}/{loose[0]} is not a .rkllm model file")
    return loose[0]


def _narrow(files: list[str], key: Callable[[str], bool]) -> list[str]:
    chosen = [f for f in files if key(f)]
    return chosen or files


def _refuse(ref: HubRef, files: Sequence[str], why: str) -> AmbiguousModelFileError:
    commands = "\n".join(f"  rkllm pull {ref.repo_id}/{f}" for f in files)
    return AmbiguousModelFileError(
        f"{ref.repo_id} holds {len(files)} .rkllm files and {why}; pick one with:\n{commands}",
        repo_id=ref.repo_id,
        files=files,
    )


def choose_model_file(ref: HubRef, paths: Sequence[str], *, board: str | None, abi: str | None) -> str:
    """The ``.rkllm`` file of the repository to pull.

    Args:
        ref: the parsed reference.
        paths: every file of the repository, as paths inside it.
        board: this board's SoC (:func:`rkllm_core.board.detect_board_platform`), None when unknown.
        abi: the runtime library's ABI (:func:`library_abi`), None when unknown.

    Returns:
        The chosen file's path inside the repository.

    Raises:
        PullError: the named file is not there or not a ``.rkllm``, or the
            repository holds no ``.rkllm`` file (matching the tag).
        AmbiguousModelFileError: several files remain and nothing tells
            which one; the message lists a command for each.
    """
    models = sorted(p for p in paths if p.lower().endswith(_MODEL_SUFFIX))
    if ref.filename:
        return _pick_named(ref, paths, models)
    if not models:
        raise PullError(f"{ref.repo_id} holds no .rkllm file; its files are:\n{_listing(sorted(paths))}")
    if ref.tag:
        tagged = [m for m in models if ref.tag.lower() in m.lower()]
        if not tagged:
            raise PullError(f"no .rkllm file of {ref.repo_id} matches {ref.tag!r}; its .rkllm files are:\n"
                            f"{_listing(models)}")  # fmt: skip
        models = tagged
    if len(models) == 1:
        return models[0]
    if board is None:
        if len({file_platform(m) for m in models}) > 1:
            raise _refuse(ref, models, "this machine's SoC is unknown (no Rockchip SoC in the device tree)")
    else:
        suited = [m for m in models if platform_matches(file_platform(m), board)]
        suited = suited or [m for m in models if file_platform(m) is None]
        if not suited:
            raise _refuse(ref, models, f"none is built for this board's {board}")
        models = suited
    if abi is not None:
        models = _narrow(models, lambda m: file_runtime_abi(m) == abi)
        models = _narrow(models, lambda m: file_runtime_abi(m) in (abi, None))
    if len(models) == 1:
        return models[0]
    raise _refuse(ref, models, "nothing tells which one suits this board")


def _encoders(model: str, paths: Sequence[str], board: str | None) -> list[str]:
    folder = posixpath.dirname(model)
    near = [p for p in paths if p.lower().endswith(_ENCODER_SUFFIX) and posixpath.dirname(p) == folder]
    encoders = near or [p for p in paths if p.lower().endswith(_ENCODER_SUFFIX) and "/" not in p]
    target = file_platform(model) or board
    if target and len(encoders) > 1:
        encoders = _narrow(encoders, lambda p: platform_matches(_encoder_platform(p), target))
    return sorted(encoders)


def _encoder_platform(repo_path: str) -> str | None:
    for word in Path(repo_path).stem.lower().replace("-", "_").split("_"):
        if PLATFORM_RE.match(word):
            return word
    return file_platform(repo_path)


def choose_companions(model: str, paths: Sequence[str], *, board: str | None) -> list[str]:
    """The files to pull with ``model``: tokenizer files, the vision encoder, README and licence.

    A companion beside the model in the repository wins over one of the same
    name at the repository's root. Of several ``.rknn`` encoders, those built
    for the model's platform (else this board's) are taken, or all of them
    when their names do not tell.

    Args:
        model: the chosen ``.rkllm`` file's path inside the repository.
        paths: every file of the repository.
        board: this board's SoC, None when unknown.

    Returns:
        Paths inside the repository, in a stable order; no two share a base name.
    """
    folder = posixpath.dirname(model)
    chosen: dict[str, str] = {}
    for place in dict.fromkeys((folder, "")):
        for path in paths:
            name = posixpath.basename(path).lower()
            if posixpath.dirname(path) == place and name in _COMPANION_NAMES and name not in chosen:
                chosen[name] = path
    companions = [chosen[n] for n in _COMPANION_NAMES if n in chosen]
    taken = {posixpath.basename(p).lower() for p in companions}
    for encoder in _encoders(model, paths, board):
        if posixpath.basename(encoder).lower() not in taken:
            taken.add(posixpath.basename(encoder).lower())
            companions.append(encoder)
    return companions
