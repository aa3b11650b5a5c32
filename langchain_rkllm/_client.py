"""What every class of this package shares: where models come from, what to wait for, the engine."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.embed import EmbeddingEngine
from rkllm_core.models.manager import ModelManager, manager_for

_E = TypeVar("_E", ChatEngine, EmbeddingEngine)

# Cross-provider init arguments that do not apply to an in-process runtime (no service, no key, nothing to retry).
_IGNORED_INIT_ARGS = frozenset({"max_retries", "api_key"})


class ModelClient(BaseModel, Generic[_E]):
    """The settings every class of this package shares, and the engine it sends requests to.

    Where models are found (``manager`` or ``model_dir``/``library_path``) and
    how long to wait for one (``timeout``). Constructing only checks the
    settings: nothing is loaded or read from disk until the first call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    """The model's friendly name, alias, file name or path (each subclass gives its default)."""

    timeout: float | None = None
    """Seconds to wait for the model (its turn on the handle, room to load it) in each call to the
    runtime before ``BusyError``; ``None`` waits as long as it takes."""

    model_dir: str | None = None
    """Look for models in this directory only (a manager of its own, shared by every
    instance with the same ``model_dir``/``library_path``). Default: the standard directories."""

    library_path: str | None = None
    """Path of ``librkllmrt.so`` or of the simulator (default: ``$RKLLM_LIB_PATH``, then the usual places)."""

    manager: ModelManager | None = Field(default=None, exclude=True)
    """The ``rkllm_core`` model manager to load models with (budget, swapping); instances
    on one manager, chat models included, share its loaded models. Default: the process-wide
    manager (or the one for ``model_dir``/``library_path``). Not serialised."""

    engine_class: ClassVar[type[ChatEngine] | type[EmbeddingEngine]]
    _core_engine: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown_arguments(cls, values: Any) -> Any:
        if isinstance(values, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(k for k in values if k not in known and k not in _IGNORED_INIT_ARGS)
            if unknown:
                warnings.warn(
                    f"{cls.__name__} ignores unknown argument(s): {', '.join(unknown)}", UserWarning, stacklevel=2
                )
        return values

    @field_validator("model_dir", "library_path", mode="before")
    @classmethod
    def _fspath(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: float | None) -> float | None:
        if value is not None and (math.isnan(value) or value < 0):
            raise ValueError("timeout must be a number of seconds, at least 0 (or None to wait as long as it takes)")
        return value

    @model_validator(mode="after")
    def _check_client(self) -> Self:  # noqa: D102
        # Pure-Python checks only: nothing is loaded or read from disk here.
        if self.manager is not None and (self.model_dir is not None or self.library_path is not None):
            raise ValueError("pass either manager= or model_dir=/library_path=, not both (the manager has its own)")
        if not self.model:
            raise ValueError("model must be a non-empty model name")
        return self

    def _engine(self) -> _E:
        """The engine on this instance's manager (nothing is loaded until a request)."""
        if self._core_engine is None:
            self._core_engine = self.engine_class(self.manager or manager_for(self.model_dir, self.library_path))
        return self._core_engine  # type: ignore[no-any-return]
