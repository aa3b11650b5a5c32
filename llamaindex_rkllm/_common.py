"""What every class of this package shares: where models come from, validation, the engine it talks to."""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Generic, TypeVar

from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr, field_validator

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.embed import EmbeddingEngine
from rkllm_core.errors import InvalidParameterError
from rkllm_core.models.manager import ModelManager, manager_for
from rkllm_core.params import check_text

_E = TypeVar("_E", ChatEngine, EmbeddingEngine)


class ModelClient(BaseModel, Generic[_E]):
    """Fields and behaviour shared by ``RKLLM``, ``RKLLMEmbedding`` and ``RKLLMRerank``.

    ``manager=`` (a constructor argument, not a field) or ``model_dir``/``library_path`` say where
    models come from; the engine is made on first use, so constructing loads nothing.
    """

    engine_class: ClassVar[type[ChatEngine] | type[EmbeddingEngine]]

    timeout: float | None = Field(
        default=None,
        description=(
            "Seconds to wait for the model when other requests hold it (or every loaded model is busy) "
            "before raising BusyError (a TimeoutError); None waits as long as needed."
        ),
    )
    model_dir: str | None = Field(
        default=None,
        description=(
            "Directory with .rkllm files. None: RKLLM_MODEL_DIR, ./models and ~/.local/share/rkllm/models. "
            "Ignored when a manager is given."
        ),
    )
    library_path: str | None = Field(
        default=None,
        description=(
            "Path to librkllmrt.so. None: RKLLM_LIB_PATH, then the usual library locations. "
            "Ignored when a manager is given."
        ),
    )

    _manager: ModelManager | None = PrivateAttr(default=None)
    _engine: Any = PrivateAttr(default=None)

    def __init__(self, model: str, *, manager: ModelManager | None = None, **kwargs: Any) -> None:
        super().__init__(model=model, **kwargs)
        if manager is not None and not isinstance(manager, ModelManager):
            raise TypeError(f"manager must be an rkllm_core ModelManager, not {type(manager).__name__}")
        self._manager = manager

    @field_validator("model_dir", "library_path", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: float | None) -> float | None:
        if value is not None and (math.isnan(value) or value < 0):
            raise InvalidParameterError(f"timeout must be a number of seconds at least 0 (or None), got {value}")
        return value

    @property
    def engine(self) -> _E:
        """The engine this instance sends its requests through (on :attr:`manager`)."""
        if self._engine is None:
            self._engine = self.engine_class(self._manager or manager_for(self.model_dir, self.library_path))
        return self._engine  # type: ignore[no-any-return]

    @property
    def manager(self) -> ModelManager:
        """The model manager requests go to."""
        return self.engine.manager


def check_model(value: str) -> str:
    """A model name: non-empty text.

    Raises:
        InvalidParameterError: empty, blank or not valid text.
    """
    check_text(value, "model")
    if not value.strip():
        raise InvalidParameterError("model must name a model, e.g. 'qwen3-0.6b'")
    return value


def check_optional_text(value: str | None, field: str) -> str | None:
    """``None`` or valid text (no NUL, no lone surrogate)."""
    return None if value is None else check_text(value, field)
