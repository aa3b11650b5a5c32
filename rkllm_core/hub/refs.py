"""What ``rkllm pull`` is asked for: the reference forms, parsed without touching the network.

Accepted forms (``OWNER/REPO`` is a Hugging Face repository id):

* ``OWNER/REPO/FILE.rkllm`` (also with folders: ``OWNER/REPO/rk3588/FILE.rkllm``);
* ``hf.co/OWNER/REPO[/FILE]``, also spelt ``huggingface.co/...`` or
  ``https://huggingface.co/...`` (a copied browser address such as
  ``.../blob/main/FILE`` or ``.../resolve/main/FILE`` works too);
* ``hf.co/OWNER/REPO:TAG`` or ``OWNER/REPO:TAG``: TAG picks the ``.rkllm`` file
  whose path contains it, ignoring case (a quantisation such as ``w8a8`` or a
  platform such as ``rk3576``); ``:latest``, Ollama's default tag, picks nothing;
* ``OWNER/REPO``: the repository's ``.rkllm`` file that suits this board.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ..errors import InvalidParameterError

__all__ = ["HubRef", "parse_ref"]

_HOSTS: Final = ("hf.co/", "huggingface.co/")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FORMS: Final = "OWNER/REPO/FILE.rkllm, hf.co/OWNER/REPO[/FILE], hf.co/OWNER/REPO:TAG or OWNER/REPO"


@dataclass(frozen=True, slots=True)
class HubRef:
    """A parsed ``rkllm pull`` reference.

    Attributes:
        repo_id: the repository, ``OWNER/REPO``.
        filename: the file asked for, as a path inside the repository, or None.
        tag: a case-insensitive piece of the wanted file's path, or None.
        revision: the branch, tag or commit asked for, or None (the default branch).
    """

    repo_id: str
    filename: str | None = None
    tag: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        text = f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id
        return f"{text}:{self.tag}" if self.tag else text


def _strip_host(ref: str) -> str:
    text = ref.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
    for host in _HOSTS:
        if text.lower().startswith(host):
            return text[len(host) :]
        if text.lower().startswith("www." + host):
            return text[len(host) + 4 :]
    return text


def parse_ref(ref: str, *, filename: str | None = None, revision: str | None = None) -> HubRef:
    """Read a ``rkllm pull`` reference.

    Args:
        ref: the reference (see the module's documentation for the forms).
        filename: a file named apart (``--file``); it wins over one in ``ref``.
        revision: a revision named apart (``--revision``); it wins over one in a copied address.

    Returns:
        The reference's parts.

    Raises:
        InvalidParameterError: ``ref`` is none of the accepted forms.
    """
    text = _strip_host(ref).strip("/")
    tag: str | None = None
    parts = text.split("/")
    if len(parts) == 2 and ":" in parts[1]:
        parts[1], _, tag = parts[1].partition(":")
        tag = tag.strip() or None
        tag = None if tag is not None and tag.lower() == "latest" else tag  # Ollama's default tag: no filter
    if len(parts) < 2 or not all(_NAME_RE.match(p) for p in parts[:2]):
        raise InvalidParameterError(f"cannot read {ref!r} as a model reference; use one of: {_FORMS}")
    in_ref = None
    rest = parts[2:]
    if len(rest) >= 2 and rest[0] in ("blob", "resolve", "tree"):  # a copied browser address
        revision = revision or rest[1]
        rest = rest[2:]
    if rest:
        in_ref = "/".join(rest)
        if any(p in ("", ".", "..") for p in rest):
            raise InvalidParameterError(f"cannot read {ref!r} as a model reference; use one of: {_FORMS}")
    return HubRef(f"{parts[0]}/{parts[1]}", filename or in_ref, tag, revision)
