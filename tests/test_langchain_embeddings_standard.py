"""LangChain's standard embeddings test suites (langchain-tests 1.1.9) for RKLLMEmbeddings.

The unit suite constructs the class with paths that do not exist (constructing
must not touch them) and checks ``RKLLM_EMBED_MODEL`` as the default model; the
integration suite embeds on the simulator, once per runtime ABI (1.2 and 1.3),
through the manager ``manager_for`` gives for its ``model_dir``/``library_path``,
closed when the module ends. Every test runs; none is overridden or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from langchain_rkllm import RKLLMEmbeddings
from rkllm_core.models.manager import manager_for
from rkllm_core.sim import make_model

MODEL = "qwen3-embedding-0.6b"
FILE = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"

_SIM: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def simulator_env(sim_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A model directory with the embedding model, and the simulator's path for each ABI."""
    models = tmp_path_factory.mktemp("lc-embed-std-models")
    make_model(models, FILE)
    for abi in ("1.2", "1.3"):
        _SIM[abi] = {"model_dir": str(models), "library_path": str(sim_paths[abi])}
    yield
    # Every instance built from these params shares one manager per ABI: close its handles (no leaks).
    for params in _SIM.values():
        manager_for(params["model_dir"], params["library_path"]).close()
    _SIM.clear()


class TestRKLLMEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[RKLLMEmbeddings]:
        return RKLLMEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        # Paths that do not exist: constructing must not load or read anything.
        return {"model": MODEL, "model_dir": "/nonexistent/rkllm-models", "library_path": "/nonexistent/librkllmrt.so"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"RKLLM_EMBED_MODEL": "bge-m3"}, {"model_dir": "/nonexistent/rkllm-models"}, {"model": "bge-m3"}


class _Integration(EmbeddingsIntegrationTests):
    abi = "1.3"

    @property
    def embeddings_class(self) -> type[RKLLMEmbeddings]:
        return RKLLMEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": MODEL, "batch_size": 2, **_SIM[self.abi]}  # 3 documents: two calls to the runtime


class TestRKLLMEmbeddingsIntegrationABI12(_Integration):
    abi = "1.2"


class TestRKLLMEmbeddingsIntegrationABI13(_Integration):
    abi = "1.3"
