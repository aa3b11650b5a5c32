"""The LlamaIndex classes take their arguments as LlamaIndex's docs and other integrations spell them.

* the model as ``model=``, ``model_name=`` (embeddings, Hugging Face LLMs) or the first argument,
  else from ``RKLLM_MODEL`` / ``RKLLM_EMBED_MODEL`` / ``RKLLM_RERANK_MODEL`` as the LangChain classes do;
  none at all is a ``ValueError`` naming the variable and ``rkllm models``, never a ``TypeError``;
* ``max_tokens`` (OpenAI, Ollama) and ``request_timeout`` (Ollama) set ``max_new_tokens`` and ``timeout``;
  ``additional_kwargs`` carries further request settings; unknown arguments are named in a warning;
* an app written the way LlamaIndex's docs write one (``Settings.llm = ...``, ``Settings.embed_model = ...``,
  ``VectorStoreIndex.from_documents``, a query engine) runs on the simulator.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

import pytest_socket  # noqa: E402
from llama_index.core import Document, Settings, VectorStoreIndex  # noqa: E402
from llama_index.core.bridge.pydantic import ValidationError  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402

from llamaindex_rkllm import RKLLM, RKLLMEmbedding, RKLLMRerank  # noqa: E402
from rkllm_core.embed.recipes import QWEN3_RERANKER  # noqa: E402
from rkllm_core.errors import InvalidParameterError  # noqa: E402
from rkllm_core.models.manager import ModelManager, default_manager, set_default_manager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

CHAT = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8.rkllm"
RERANK = "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm"
CHAT_NAME, EMBED_NAME, RERANK_NAME = "qwen3-0.6b", "qwen3-embedding-0.6b", "qwen3-reranker-0.6b"
ENV = {RKLLM: "RKLLM_MODEL", RKLLMEmbedding: "RKLLM_EMBED_MODEL", RKLLMRerank: "RKLLM_RERANK_MODEL"}
CLASSES = list(ENV)

DOCS = [
    "Orange Pi 5 boards carry a Rockchip RK3588 chip whose NPU has three cores.",
    "Bananas are yellow fruit, rich in potassium and sugar.",
    "Paris is the capital city of France and sits on the river Seine.",
    "Sourdough bread needs flour, water, salt and a starter culture.",
]
QUESTION = "How many cores does the Rockchip NPU of the Orange Pi have?"


@pytest.fixture(autouse=True)
def _no_model_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    pytest_socket.disable_socket(allow_unix_socket=True)  # LlamaIndex's defaults would try to download models
    yield
    pytest_socket.enable_socket()


# --------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("cls", CLASSES)
def test_no_model_and_no_variable_is_a_clear_value_error(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ({}, {ENV[cls]: ""}):  # unset, or set to nothing
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=f"pass model=.*see `rkllm models`.* or set {ENV[cls]}") as info:
            cls()
        assert isinstance(info.value, InvalidParameterError) and cls.__name__ in str(info.value)


@pytest.mark.parametrize("cls", CLASSES)
def test_the_model_comes_from_its_variable(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    for other in ENV.values():
        monkeypatch.setenv(other, f"from-{other.lower()}")
    assert cls().model == f"from-{ENV[cls].lower()}"  # each class reads its own variable
    assert cls("given").model == "given"  # an argument wins over the variable


@pytest.mark.parametrize("cls", CLASSES)
def test_model_model_name_and_the_first_argument_name_the_same_setting(cls: type) -> None:
    for made in (cls("m1"), cls(model="m1"), cls(model_name="m1"), cls(model="m1", model_name="m1")):
        assert made.model == "m1"
        if cls is RKLLMEmbedding:
            assert made.model_name == "m1"  # LlamaIndex's own field, reported in its events
    with pytest.raises(ValueError, match="model='m1' and model_name='m2'"):
        cls(model="m1", model_name="m2")
    with pytest.raises(ValueError, match="must name a model"):
        cls(model_name="  ")


def test_the_llm_reports_the_model_it_was_given_as_model_name(tmp_path: Path) -> None:
    llm = RKLLM(model_name="no-such-model", model_dir=tmp_path, context_window=1024)
    assert llm.metadata.model_name == "no-such-model"


# ------------------------------------------------------------------------------ other spellings


def test_max_tokens_is_max_new_tokens() -> None:
    llm = RKLLM(CHAT_NAME, max_tokens=77)
    assert llm.max_new_tokens == 77 and llm.metadata.num_output == 77  # LlamaIndex leaves room for it
    with pytest.raises(ValueError, match="max_new_tokens=76 and max_tokens=77"):
        RKLLM(CHAT_NAME, max_tokens=77, max_new_tokens=76)
    with pytest.raises(ValidationError):
        RKLLM(CHAT_NAME, max_tokens=0)  # validated as max_new_tokens is


@pytest.mark.parametrize("cls", CLASSES)
def test_request_timeout_is_timeout(cls: type) -> None:
    assert cls("m", request_timeout=120.0).timeout == 120.0
    assert cls("m", request_timeout=5, timeout=5).timeout == 5
    with pytest.raises(ValueError, match="timeout=1 and request_timeout=2"):
        cls("m", timeout=1, request_timeout=2)
    with pytest.raises(ValueError):
        cls("m", request_timeout=-1)  # validated as timeout is


@pytest.mark.parametrize("cls", CLASSES)
def test_unknown_arguments_are_named_in_a_warning(cls: type) -> None:
    with pytest.warns(UserWarning, match=f"{cls.__name__} ignores unknown argument\\(s\\): base_url, keep_alive"):
        made = cls("m", base_url="http://localhost:11434", keep_alive="5m")
    assert made.model == "m"


def test_additional_kwargs_are_checked_when_constructed() -> None:
    assert RKLLM(CHAT_NAME, additional_kwargs={"mirostat": 2, "max_tokens": 9}).additional_kwargs == {
        "mirostat": 2,
        "max_tokens": 9,
    }
    with pytest.raises(ValueError, match="additional_kwargs: RKLLM does not know num_ctx"):
        RKLLM(CHAT_NAME, additional_kwargs={"num_ctx": 8192})  # an Ollama option
    with pytest.raises(ValueError, match="top_p"):
        RKLLM(CHAT_NAME, additional_kwargs={"top_p": 3.0})  # a known setting, with a bad value


def test_serialisation_round_trip_keeps_the_new_settings() -> None:
    llm = RKLLM(model_name=CHAT_NAME, max_tokens=12, request_timeout=3.0, additional_kwargs={"top_k": 5})
    again = RKLLM.from_dict(llm.to_dict())
    assert (again.model, again.max_new_tokens, again.timeout, again.additional_kwargs) == (
        CHAT_NAME,
        12,
        3.0,
        {"top_k": 5},
    )


# ------------------------------------------------------------------------------ on the simulator


@pytest.fixture
def abi() -> str:
    """ABI 1.3 unless a test parametrizes ``abi`` itself."""
    return "1.3"


@pytest.fixture
def models(model_dir: Path) -> Path:
    make_model(model_dir, CHAT)
    make_model(model_dir, EMBED)
    make_model(model_dir, RERANK, yes_token=QWEN3_RERANKER.yes_id, no_token=QWEN3_RERANKER.no_id)
    return model_dir


@pytest.fixture
def manager(
    models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModelManager]:
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "prompt-cache"))
    with ModelManager(ModelRegistry([models], platform=None), library=sim_lib, max_loaded=3) as m:
        yield m


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_max_tokens_and_additional_kwargs_limit_the_answer(manager: ModelManager) -> None:
    long_prompt = "Repeat these words back to me please: " + " ".join(f"w{i}" for i in range(40))

    def answer(llm: RKLLM, **kwargs: Any) -> tuple[int, str]:
        raw = llm.complete(long_prompt, **kwargs).raw
        return raw["usage"]["completion_tokens"], raw["finish_reason"]

    assert answer(RKLLM(CHAT_NAME, manager=manager, max_tokens=6)) == (6, "length")
    extra = RKLLM(CHAT_NAME, manager=manager, additional_kwargs={"max_tokens": 4})
    assert answer(extra) == (4, "length")
    assert answer(extra, max_tokens=7) == (7, "length")  # a call's argument wins
    assert answer(RKLLM(CHAT_NAME, manager=manager))[1] == "stop"  # unlimited, the echo ends by itself


@pytest.fixture
def app(
    models: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """An app's process: models and runtime found through the environment, LlamaIndex's Settings its own."""
    monkeypatch.setenv("RKLLM_MODEL_DIR", str(models))
    monkeypatch.setenv("RKLLM_LIB_PATH", str(sim_lib.path))
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "prompt-cache"))
    monkeypatch.setenv("RKLLM_MAX_LOADED", "3")
    previous = set_default_manager(None)  # a process-wide manager made from this environment
    saved = (Settings._llm, Settings._embed_model)
    try:
        yield
    finally:
        Settings._llm, Settings._embed_model = saved
        ours = set_default_manager(previous)
        if ours is not None:
            ours.close()


def _ask(rerank: RKLLMRerank) -> None:
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS])
    query_engine = index.as_query_engine(similarity_top_k=3, node_postprocessors=[rerank])
    response = query_engine.query(QUESTION)
    assert str(response).startswith("Echo: Context information is below.")  # the simulator echoes the prompt
    assert [n.node.get_content() for n in response.source_nodes] == [DOCS[0]]
    assert DOCS[0] in str(response)  # the reranked passage reached the LLM


def test_an_app_written_as_llamaindex_docs_write_one(app: None, sim: SimulatorControl) -> None:
    Settings.llm = RKLLM(model=CHAT_NAME, max_tokens=512, request_timeout=120.0, temperature=0.7)
    Settings.embed_model = RKLLMEmbedding(model_name=EMBED_NAME)
    _ask(RKLLMRerank(model=RERANK_NAME, top_n=1))
    assert Settings.llm.manager is Settings.embed_model.manager is default_manager()


def test_an_app_that_names_its_models_in_the_environment(
    app: None, sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_MODEL", CHAT_NAME)
    monkeypatch.setenv("RKLLM_EMBED_MODEL", EMBED_NAME)
    monkeypatch.setenv("RKLLM_RERANK_MODEL", RERANK_NAME)
    Settings.llm = RKLLM()
    Settings.embed_model = RKLLMEmbedding()
    _ask(RKLLMRerank(top_n=1))
    assert (Settings.llm.model, Settings.embed_model.model_name) == (CHAT_NAME, EMBED_NAME)


def test_callback_manager_and_system_prompt_given_at_construction(manager: ModelManager, sim: SimulatorControl) -> None:
    counter = TokenCountingHandler(tokenizer=str.split)
    llm = RKLLM(CHAT_NAME, manager=manager, callback_manager=CallbackManager([counter]), system_prompt="You are terse.")
    sim.set("trace", 1)
    r = llm.complete("hello there")
    assert counter.completion_llm_token_count == r.raw["usage"]["completion_tokens"] > 0  # read from raw["usage"]
    slot = [t for t in sim.trace() if t["fn"] == "rkllm_set_chat_template"][-1]["system_prompt"]
    assert "You are terse." in slot
