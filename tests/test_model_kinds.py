"""Model kinds: read from file names, overridable in the registry file, enforced by the chat classes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rkllm_core.chat.engine import ChatEngine
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.errors import InvalidParameterError, ModelKindError
from rkllm_core.filenames import MODEL_KINDS, parse_model_filename
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import CHAT_KINDS, ModelRegistry
from rkllm_core.native.library import RuntimeLibrary
from rkllm_core.sim import SimulatorControl, make_model
from rkllm_core.tools.cli import main

CHAT = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
EMBED = "Qwen3-Embedding-0.6B-rk3588-w8a8_g256-opt-1-hybrid-ratio-0.0.rkllm"
RERANK = "Qwen3-Reranker-0.6B-rk3588-w8a8.rkllm"
VISION = "qwen2.5-vl-3b-w8a8_level1_rk3588.rkllm"


@pytest.mark.parametrize(
    ("filename", "kind"),
    [
        (CHAT, "chat"),
        ("Qwen2.5-Coder-1.5B-Instruct-rk3588-w8a8_g128-opt-0-hybrid-ratio-0.5.rkllm", "chat"),
        ("DeepSeek-R1-Distill-Qwen-1.5B_w4a16_RK3576.rkllm", "chat"),
        (EMBED, "embedding"),
        ("Qwen3-Embedding-0.6B_w8a8.rkllm", "embedding"),
        ("bge-m3-embed-w8a8.rkllm", "embedding"),
        (RERANK, "reranker"),
        ("bge-reranker-v2-m3-w8a8.rkllm", "reranker"),
        (VISION, "vision"),
        ("Qwen2-VL-2B-Instruct-rk3588-w8a8.rkllm", "vision"),
        ("Qwen2.5-Omni-3B-rk3588-w8a8.rkllm", "vision"),
        ("internvl3-1b_w8a8_rk3588.rkllm", "vision"),
        ("MiniCPMV4_rk3576_w4a16.rkllm", "vision"),
        ("smolvlm2_500m_llm_w8a8_rk3588.rkllm", "vision"),
        ("Janus-Pro-1B-rk3588.rkllm", "vision"),
        ("deepseekocr_w8a8_rk3588.rkllm", "vision"),
        ("xiaoji_3576.rkllm", "chat"),
    ],
)
def test_kind_from_file_name(filename: str, kind: str) -> None:
    assert parse_model_filename(filename).kind == kind


def test_every_corpus_file_has_a_kind() -> None:
    data = Path(__file__).parent / "data" / "model-filenames.jsonl"
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    kinds = {row["filename"]: parse_model_filename(row["filename"]).kind for row in rows}
    assert set(kinds.values()) <= set(MODEL_KINDS)
    for filename, kind in kinds.items():
        lower = filename.lower()
        if "embedding" in lower:
            assert kind == "embedding", filename
        elif "-vl-" in lower or "internvl" in lower or "smolvlm" in lower:
            assert kind == "vision", filename
    assert {"chat", "embedding", "vision"} <= set(kinds.values())


# -- the registry file can say what a name does not ---------------------------------------------------------------


def test_registry_file_overrides_kind_and_a_bad_kind_is_left_out_alone(tmp_path: Path) -> None:
    make_model(tmp_path, "mystery-1b-w8a8.rkllm")
    make_model(tmp_path, EMBED)
    make_model(tmp_path, CHAT)
    (tmp_path / "rkllm-models.toml").write_text(
        '[models."mystery-1b"]\nkind = "embedding"\naliases = ["mystery"]\n'
        '[models."qwen3-embedding-0.6b"]\nkind = "chat"\n'
        '[models."qwen3-0.6b"]\nkind = "poem"\ntemperature = 0.3\n',
        encoding="utf-8",
    )
    registry = ModelRegistry([tmp_path], platform=None)
    assert registry.get("mystery").kind == "embedding"
    assert registry.get("mystery-1b").facts.kind == "chat"  # what the name alone says
    assert registry.get("qwen3-embedding-0.6b").kind == "chat"
    qwen = registry.get("qwen3-0.6b")
    assert qwen.kind == "chat" and qwen.defaults.sampling.temperature == 0.3  # only the bad kind was left out
    assert len(registry.errors) == 1 and isinstance(registry.errors[0], InvalidParameterError)
    assert "kind must be one of chat, embedding, reranker, vision" in str(registry.errors[0])
    assert "'poem'" in str(registry.errors[0])


def test_models_command_shows_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in (CHAT, EMBED, RERANK, VISION):
        make_model(tmp_path, name)
    assert main(["models", "--json", "--model-dir", str(tmp_path)]) == 0
    rows = {row["name"]: row["kind"] for row in json.loads(capsys.readouterr().out)}
    assert rows == {
        "qwen3-0.6b": "chat",
        "qwen3-embedding-0.6b": "embedding",
        "qwen3-reranker-0.6b": "reranker",
        "qwen2.5-vl-3b": "vision",
    }
    assert main(["models", "--model-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["NAME", "KIND"]
    assert {tuple(line.split()[:2]) for line in table[2:]} == set(rows.items())


# -- the chat classes refuse other kinds before anything loads -----------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl) -> Iterator[ModelManager]:
    for name in (CHAT, EMBED, RERANK, VISION):
        make_model(tmp_path / "models", name)
    m = ModelManager(ModelRegistry([tmp_path / "models"], platform=None), library=sim_lib)
    yield m
    m.close()


def _refusal(exc: ModelKindError, model: str, kind: str) -> None:
    assert exc.model == model and exc.kind == kind and exc.accepted == CHAT_KINDS
    text = str(exc)
    assert f"'{model}'" in text and f"is {'an' if kind[0] in 'aeiou' else 'a'} {kind} model" in text
    assert "ChatRKLLM" in text and "rkllm-models.toml" in text


@pytest.mark.parametrize(
    ("model", "kind"), [("qwen3-embedding-0.6b", "embedding"), ("qwen3-reranker-0.6b", "reranker")]
)
def test_engine_refuses_non_chat_models_and_keeps_serving(
    manager: ModelManager, sim: SimulatorControl, model: str, kind: str
) -> None:
    engine = ChatEngine(manager, prompt_cache=False)
    before = sim.counter("inits")
    with pytest.raises(ModelKindError) as caught:
        engine.chat(model, [ChatMessage("user", "hi")])
    _refusal(caught.value, model, kind)
    with pytest.raises(ModelKindError):
        asyncio.run(engine.achat(model, [ChatMessage("user", "hi")]))
    assert sim.counter("inits") == before and manager.loaded() == [] and manager.waiting() == 0
    assert engine.chat("qwen3-0.6b", [ChatMessage("user", "hi")]).message.content == "Echo: hi — ok."
    assert engine.chat("qwen2.5-vl-3b", [ChatMessage("user", "hi")]).message.content  # vision: text is fine


def test_manager_leases_any_kind_unless_asked_to_check(manager: ModelManager) -> None:
    with manager.lease("qwen3-embedding-0.6b") as lease:  # the embedding classes will lease it like this
        assert lease.info.kind == "embedding"
    with pytest.raises(ModelKindError):
        manager.lease("qwen3-embedding-0.6b", kinds=(("chat",), "a test"))


def test_langchain_chat_model_refuses_an_embedding_model(manager: ModelManager) -> None:
    from langchain_rkllm import ChatRKLLM

    chat = ChatRKLLM(model="qwen3-embedding-0.6b", manager=manager)
    with pytest.raises(ModelKindError) as caught:
        chat.invoke("hello")
    _refusal(caught.value, "qwen3-embedding-0.6b", "embedding")
    with pytest.raises(ModelKindError):
        asyncio.run(chat.ainvoke("hello"))
    with pytest.raises(ModelKindError):
        list(chat.stream("hello"))
    assert manager.loaded() == []


def test_llamaindex_llm_refuses_a_reranker_model(manager: ModelManager) -> None:
    from llama_index.core.llms import ChatMessage as LIMessage

    from llamaindex_rkllm import RKLLM

    llm = RKLLM("qwen3-reranker-0.6b", manager=manager)
    with pytest.raises(ModelKindError) as caught:
        llm.chat([LIMessage(role="user", content="hello")])
    _refusal(caught.value, "qwen3-reranker-0.6b", "reranker")
    with pytest.raises(ModelKindError):
        asyncio.run(llm.acomplete("hello"))
    assert manager.loaded() == []
