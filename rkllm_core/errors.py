"""One exception hierarchy for everything ``rkllm_core`` raises.

Every class derives from :class:`RKLLMError` and, where one fits, from the
matching builtin too, so callers can catch either ``RKLLMError`` or the
builtin they already expect (``LookupError`` for an unknown model, ``OSError``
for a missing library, ``ValueError`` for bad arguments, ``TimeoutError`` for
a busy handle).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ABIError",
    "AmbiguousModelFileError",
    "BusyError",
    "CacheError",
    "ChecksumError",
    "ContextLengthError",
    "HandleClosedError",
    "ImageError",
    "InitError",
    "InvalidParameterError",
    "LibraryNotFoundError",
    "ModelFileError",
    "ModelKindError",
    "ModelNotFoundError",
    "NativeError",
    "NoModelsFoundError",
    "PreflightError",
    "PullError",
    "RKLLMError",
    "RKNNError",
    "RunError",
    "UnsupportedRuntimeError",
    "VisionUnavailableError",
]


class RKLLMError(Exception):
    """Base class of every error raised by ``rkllm_core``."""


class LibraryNotFoundError(RKLLMError, OSError):
    """``librkllmrt.so`` could not be found or loaded.

    Attributes:
        tried: every path or name that was tried, in order.
    """

    def __init__(self, message: str, tried: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tried: tuple[str, ...] = tuple(tried)

    def __str__(self) -> str:  # OSError formats args oddly; keep our message
        return str(self.args[0]) if self.args else ""


class ABIError(RKLLMError, RuntimeError):
    """The runtime library's ABI could not be established; nothing was initialised."""


class UnsupportedRuntimeError(ABIError):
    """The runtime library is a version this package does not support (<= 1.2.0)."""


class NativeError(RKLLMError, RuntimeError):
    """A native runtime function returned a failure code.

    Attributes:
        code: the integer the native function returned.
        function: the name of the native function.
    """

    def __init__(self, message: str, *, code: int | None = None, function: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.function = function


class InitError(NativeError):
    """``rkllm_init`` failed (bad model file, context above the limit, driver, permissions)."""


class RKNNError(NativeError):
    """A ``librknnrt`` call (the vision encoder's runtime) returned a failure code; ``function`` names it."""


class RunError(NativeError):
    """A generation failed: ``rkllm_run`` returned an error or the runtime reported ERROR."""


class PreflightError(RKLLMError, RuntimeError):
    """A check before ``rkllm_init`` found that loading the model would crash the runtime; nothing was loaded.

    Attributes:
        check: which check: ``"memory"`` or ``"npu driver"``.
    """

    def __init__(self, message: str, *, check: str) -> None:
        super().__init__(message)
        self.check = check


class HandleClosedError(RKLLMError, RuntimeError):
    """The runtime handle was used after ``close()``."""


class BusyError(RKLLMError, TimeoutError):
    """A model could not be had: busy past the caller's ``timeout``, or waiting would never end.

    It is a :class:`TimeoutError`, so ``except TimeoutError`` (and, since Python 3.11,
    ``except asyncio.TimeoutError`` around ``asyncio.wait_for``) catches it too: put
    ``except BusyError`` first where the two mean different things to you.

    Attributes:
        reason: ``"timeout"`` (waited ``waited`` seconds), ``"deadlock"`` (refused at
            once: the caller holds what it would wait for, e.g. a nested request from
            inside its own stream), or ``"busy"`` (the handle is in the middle of a run).
        waited: the timeout that ran out, for ``"timeout"``.
    """

    def __init__(self, message: str, *, reason: str = "timeout", waited: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.waited = waited

    def __str__(self) -> str:  # OSError-style formatting of TimeoutError would show the args tuple
        return str(self.args[0]) if self.args else ""


class InvalidParameterError(RKLLMError, ValueError):
    """An argument is out of range or of the wrong kind; nothing was sent to the runtime."""


class ContextLengthError(InvalidParameterError):
    """A context length or prompt does not fit the model's context window.

    Attributes:
        requested: the number of tokens asked for.
        limit: the limit it exceeds.
    """

    def __init__(self, message: str, *, requested: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.requested = requested
        self.limit = limit


class ModelKindError(InvalidParameterError):
    """A model of the wrong kind for the class asked to use it (an embedding model for chat).

    Nothing was loaded. The message names the classes that serve the model's kind.

    Attributes:
        model: the model's friendly name.
        kind: the model's kind (``chat``, ``embedding``, ``reranker``, ``vision``).
        accepted: the kinds the refusing class serves.
    """

    def __init__(self, message: str, *, model: str = "", kind: str = "", accepted: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.model = model
        self.kind = kind
        self.accepted: tuple[str, ...] = tuple(accepted)


class ModelFileError(RKLLMError, ValueError):
    """A model file is missing, unreadable or not a model the runtime can load."""


class ModelNotFoundError(RKLLMError, LookupError):
    """No registered model matches the requested name.

    Attributes:
        name: the name that was asked for.
        suggestions: close matches, best first.
        known: every known name.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str = "",
        suggestions: Sequence[str] = (),
        known: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.name = name
        self.suggestions: tuple[str, ...] = tuple(suggestions)
        self.known: tuple[str, ...] = tuple(known)

    def __str__(self) -> str:  # KeyError-style repr quoting is unhelpful here
        return str(self.args[0]) if self.args else ""


class NoModelsFoundError(ModelNotFoundError):
    """No ``.rkllm`` file was found in any model directory.

    Attributes:
        searched: the directories that were searched.
    """

    def __init__(self, message: str, *, searched: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.searched: tuple[str, ...] = tuple(searched)


class CacheError(RKLLMError, OSError):
    """A cache file could not be read or written."""


class PullError(RKLLMError, OSError):
    """A model could not be pulled from the Hugging Face Hub, or a pulled model could not be removed.

    Unknown repository or file, no ``.rkllm`` file in the repository, network
    or disk failure, offline mode, ``huggingface_hub`` not installed. Nothing
    half-downloaded is ever visible to the registry.
    """

    def __str__(self) -> str:  # OSError formats args oddly; keep our message
        return str(self.args[0]) if self.args else ""


class AmbiguousModelFileError(PullError):
    """A repository holds several ``.rkllm`` files and nothing tells which one suits this board.

    Attributes:
        repo_id: the repository (``OWNER/REPO``).
        files: the candidate files, as paths inside the repository.
    """

    def __init__(self, message: str, *, repo_id: str = "", files: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.files: tuple[str, ...] = tuple(files)


class ChecksumError(PullError):
    """A downloaded file does not match the checksum the Hub gives for it; it was deleted.

    Attributes:
        filename: the file, as a path inside the repository.
        expected: the Hub's checksum.
        actual: the checksum of what was received.
    """

    def __init__(self, message: str, *, filename: str = "", expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.filename = filename
        self.expected = expected
        self.actual = actual


class ImageError(InvalidParameterError):
    """An image could not be used; nothing was sent to the encoder.

    Not an image, truncated, an undecodable format (SVG), too large, or a URL that is not allowed,
    too large or too slow.

    Attributes:
        reason: a short machine-readable cause (``"not-an-image"``, ``"truncated"``, ``"too-large"``,
            ``"remote-disabled"``, ``"remote-too-large"``, ``"remote-timeout"``, ...).
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class VisionUnavailableError(RKLLMError, ImportError):
    """Image support needs Pillow, which is not installed (the ``vision`` extra)."""
