"""The error of a request body that does not follow its wire format (a 400 naming the field)."""

from __future__ import annotations

from ..errors import InvalidParameterError

__all__ = ["WireError"]


class WireError(InvalidParameterError):
    """A request body that does not follow the wire format.

    Attributes:
        param: the offending field, dotted (``messages[0].role``).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
