"""What every class of this package shares: where models come from, validation, the engine it talks to."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
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

    The model is the first argument, ``model=`` or ``model_name=`` (LlamaIndex's spelling for
    embeddings and Hugging Face models), else the environment variable :attr:`model_env`.
    Arguments spelled the way other LlamaIndex integrations spell them (:attr:`init_aliases`,
    e.g. Ollama's ``request_timeout``) set the field they mean; any other argument this class
    does not know is ignored with a ``UserWarning`` naming it.
    """

    engine_class: ClassVar[type[ChatEngine] | type[EmbeddingEngine]]
    model_env: ClassVar[str] = "RKLLM_MODEL"
    """The environment variable naming the model when none is passed."""
    model_example: ClassVar[str] = "qwen3-0.6b"
    """A model name for the error message when no model is given."""
    init_aliases: ClassVar[Mapping[str, str]] = {"request_timeout": "timeout"}
    """Other integrations' names of this class's fields (``request_timeout``: Ollama's ``timeout``)."""

    timeout: float | None = Field(
        default=None,
        description=(
            "Seconds to wait for the model when other requests hold it (or every loaded model is busy) "
            "before raising BusyError (a TimeoutError); None waits as long as needed. request_timeout (Ollama's "
            "name) sets it too."
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

    def __init__(self, model: str | None = None, *, manager: ModelManager | None = None, **kwargs: Any) -> None:
        kwargs = self._canonical_arguments(kwargs)
        super().__init__(model=self._model_argument(model, kwargs), **kwargs)
        if manager is not None and not isinstance(manager, ModelManager):
            raise TypeError(f"manager must be an rkllm_core ModelManager, not {type(manager).__name__}")
        self._manager = manager

    @classmethod
    def _model_argument(cls, model: str | None, kwargs: dict[str, Any]) -> str:
        """The model to use: ``model`` or ``model_name`` (which must agree), else ``$model_env``.

        ``model_name`` is taken out of ``kwargs`` unless it is a field of the class (embeddings).

        Raises:
            InvalidParameterError: ``model`` and ``model_name`` differ, or no model is given or set.
        """
        name = kwargs.get("model_name") if "model_name" in cls.model_fields else kwargs.pop("model_name", None)
        if model is not None and name is not None and model != name:
            raise InvalidParameterError(
                f"{cls.__name__} got model={model!r} and model_name={name!r}: they are the same setting, pass one"
            )
        chosen = model if model is not None else name
        if chosen is None:
            chosen = os.environ.get(cls.model_env) or None
        if chosen is None:
            raise InvalidParameterError(
                f"{cls.__name__} needs a model: pass model={cls.model_example!r} (see `rkllm models`) "
                f"or set {cls.model_env}"
            )
        return chosen

    @classmethod
    def _canonical_arguments(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with other integrations' names (:attr:`init_aliases`) turned into this class's fields.

        Raises:
            InvalidParameterError: a field is given under two names with different values.
        """
        out = dict(kwargs)
        for alias, field in cls.init_aliases.items():
            if alias not in out:
                continue
            value = out.pop(alias)
            if field in out and out[field] != value:
                raise InvalidParameterError(
                    f"{cls.__name__} got {field}={out[field]!r} and {alias}={value!r}: they are the same setting, "
                    "pass one"
                )
            out[field] = value
        known = {*cls.model_fields, "model_name"}
        unknown = sorted(k for k in out if k not in known)
        if unknown:
            warnings.warn(
                f"{cls.__name__} ignores unknown argument(s): {', '.join(unknown)}", UserWarning, stacklevel=3
            )
        return out

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
