"""RKLLM inside LlamaIndex pipelines, offline (MockEmbedding) on the simulator.

* a query engine over a few local documents answers through RKLLM, with the retrieved
  text reaching the runtime (checked in the simulator's call trace);
* the condense-plus-context chat engine over several turns, with the prefill per turn
  measured by the simulator's counters.

What KV-cache reuse can and cannot do for condense-plus-context (measured below):

* The runtime holds one token sequence per loaded model. A request is cheap only when it
  *extends* that sequence: same system prompt, same earlier turns, new messages at the end.
* From the second turn on, the engine first asks the LLM to condense the chat into a
  standalone question: a different one-off conversation that replaces the chat in the KV
  cache, so the answer call must rebuild the whole chat (2 rebuilds per turn, and the
  prefill grows with the conversation).
* The retrieved context goes into the system prompt, i.e. at the very start of the
  sequence: when retrieval returns other text, everything is prefilled again even
  without the condense step.
* With ``skip_condense=True`` and follow-ups that retrieve the same passages, each turn
  extends the conversation in the KV cache and prefills only the new question.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, SimpleDirectoryReader, VectorStoreIndex  # noqa: E402
from llama_index.core.chat_engine import CondensePlusContextChatEngine  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

from llamaindex_rkllm import RKLLM  # noqa: E402
from rkllm_core.models.manager import ModelManager  # noqa: E402
from rkllm_core.models.registry import ModelRegistry  # noqa: E402
from rkllm_core.native.library import RuntimeLibrary  # noqa: E402
from rkllm_core.sim import SimulatorControl, make_model  # noqa: E402

QWEN = "Qwen_Qwen3-0.6B-w8a8-opt0-hybrid0-npu3-ctx4096-rk3588.rkllm"
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture
def abi() -> str:
    return "1.3"


@pytest.fixture
def llm(
    model_dir: Path, sim_lib: RuntimeLibrary, sim: SimulatorControl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RKLLM]:
    monkeypatch.setenv("RKLLM_PROMPT_CACHE_DIR", str(tmp_path / "prompt-cache"))
    make_model(model_dir, QWEN)
    with ModelManager(ModelRegistry([model_dir], platform=None), library=sim_lib) as manager:
        yield RKLLM("qwen3-0.6b", manager=manager)


@pytest.fixture
def index() -> VectorStoreIndex:
    documents = SimpleDirectoryReader(str(DATA), required_exts=[".txt"]).load_data()
    assert len(documents) >= 3
    return VectorStoreIndex.from_documents(documents, embed_model=MockEmbedding(embed_dim=16))


def run_prompts(sim: SimulatorControl) -> list[str]:
    return [t["prompt"] for t in sim.trace() if t["fn"] == "rkllm_run"]


def test_query_engine_answers_from_local_documents(llm: RKLLM, index: VectorStoreIndex, sim: SimulatorControl) -> None:
    sim.set("trace", 1)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    response = engine.query("How many NPU cores does the RK3588 have?")
    assert len(response.source_nodes) == 2
    # The simulator echoes the prompt: the answer starts with LlamaIndex's QA prompt and its context.
    assert str(response).startswith("Echo: Context information is below.")
    (prompt,) = run_prompts(sim)
    for node in response.source_nodes:
        assert node.node.get_content() in prompt  # the retrieved text reached the runtime
    assert "Query: How many NPU cores does the RK3588 have?" in prompt


def test_streaming_query_engine(llm: RKLLM, index: VectorStoreIndex, sim: SimulatorControl) -> None:
    streaming = index.as_query_engine(llm=llm, streaming=True).query("Which chip does the Orange Pi 5 use?")
    tokens = list(streaming.response_gen)
    assert len(tokens) > 1 and "".join(tokens).startswith("Echo: Context information is below.")
    assert sim.counter("runs") == 1


async def test_async_query_engine(llm: RKLLM, index: VectorStoreIndex) -> None:
    response = await index.as_query_engine(llm=llm).aquery("What does the RKLLM-Toolkit do?")
    assert str(response).startswith("Echo: Context information is below.")


# --------------------------------------------------------------------- condense plus context

QUESTIONS = [
    "Tell me about alpha boards.",
    "And the beta boards?",
    "What about gamma boards?",
    "Compare them with delta boards.",
]


class KeywordRetriever(BaseRetriever):
    """Returns the node whose first word appears in the query: the context changes every turn."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self._nodes = [TextNode(text=t, id_=f"n{i}") for i, t in enumerate(texts)]

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        q = query_bundle.query_str.lower()
        return [NodeWithScore(node=n, score=1.0) for n in self._nodes if n.text.split()[0].lower() in q][:1]


def converse(engine: CondensePlusContextChatEngine, sim: SimulatorControl) -> list[dict[str, int]]:
    turns = []
    for q in QUESTIONS:
        sim.reset()
        answer = engine.chat(q)
        assert str(answer) == f"Echo: {q} — ok."
        c = sim.counters()
        turns.append({k: c[k] for k in ("runs", "prefilled_tokens", "kv_clears", "prompt_cache_hit_tokens")})
    return turns


def test_condense_plus_context_kv_reuse(llm: RKLLM, sim: SimulatorControl) -> None:
    texts = [
        f"{w} boards have {n} NPU cores and ship with {n * 4} GB of memory."
        for n, w in enumerate(["Alpha", "Beta", "Gamma", "Delta"], 1)
    ]
    stable_index = VectorStoreIndex([Document(text=t) for t in texts], embed_model=MockEmbedding(embed_dim=16))

    def engine(retriever: BaseRetriever, **kwargs: bool) -> CondensePlusContextChatEngine:
        return CondensePlusContextChatEngine.from_defaults(
            retriever, llm=llm, system_prompt="Answer in one sentence.", **kwargs
        )

    # A. Default settings: condense step + context in the system prompt.
    default = converse(engine(stable_index.as_retriever(similarity_top_k=4)), sim)
    # B. skip_condense, and retrieval returns the same passages every turn (MockEmbedding: all tie).
    stable = converse(engine(stable_index.as_retriever(similarity_top_k=4), skip_condense=True), sim)
    # C. skip_condense, but every turn retrieves another passage.
    changing = converse(engine(KeywordRetriever(texts), skip_condense=True), sim)

    # Shown with -s or on failure, e.g.:  A 306 (1, 0)  548 (2, 2)  634 (2, 2)  726 (2, 2)
    #                                      B   0 (1, 1)   49 (1, 0)   51 (1, 0)   52 (1, 0)  (turn 1: prompt cache)
    #                                      C 247 (1, 1)  305 (1, 1)  364 (1, 1)  425 (1, 1)
    print("\nprefilled tokens per turn (runs, KV clears):")
    for name, turns in (
        ("A default", default),
        ("B skip_condense, same context", stable),
        ("C skip_condense, new context", changing),
    ):
        print(f"  {name:32s}", "  ".join(f"{t['prefilled_tokens']:4d} ({t['runs']}, {t['kv_clears']})" for t in turns))

    later = range(1, len(QUESTIONS))
    # A: two LLM calls per turn from turn 2, both rebuilt; the answer call re-prefills the whole chat,
    # so the prefill grows turn after turn.
    assert [default[t]["runs"] for t in later] == [2, 2, 2]
    assert all(default[t]["kv_clears"] == 2 for t in later)
    assert default[1]["prefilled_tokens"] < default[2]["prefilled_tokens"] < default[3]["prefilled_tokens"]
    # B: one call per turn, the KV cache is extended: only the new question is prefilled.
    assert all(stable[t]["runs"] == 1 and stable[t]["kv_clears"] == 0 for t in later)
    assert all(stable[t]["prefilled_tokens"] < 0.2 * default[t]["prefilled_tokens"] for t in later)
    assert max(stable[t]["prefilled_tokens"] for t in later) < 80
    # C: one call per turn, but a new system prompt each turn: everything is prefilled again and grows.
    assert all(changing[t]["runs"] == 1 and changing[t]["kv_clears"] == 1 for t in later)
    assert changing[1]["prefilled_tokens"] < changing[2]["prefilled_tokens"] < changing[3]["prefilled_tokens"]
    assert all(changing[t]["prefilled_tokens"] > 4 * stable[t]["prefilled_tokens"] for t in later)


async def test_condense_plus_context_async_and_streaming(llm: RKLLM, index: VectorStoreIndex) -> None:
    engine = CondensePlusContextChatEngine.from_defaults(index.as_retriever(), llm=llm)
    first = await engine.achat("What is the RK3588?")
    assert str(first) == "Echo: What is the RK3588? — ok."
    streamed = await engine.astream_chat("How many NPU cores does it have?")
    tokens = [t async for t in streamed.async_response_gen()]
    assert "".join(tokens) == "Echo: How many NPU cores does it have? — ok."
    assert len(engine.chat_history) == 4


def test_simple_chat_engine_extends_the_kv_cache(llm: RKLLM, sim: SimulatorControl) -> None:
    from llama_index.core.chat_engine import SimpleChatEngine

    engine = SimpleChatEngine.from_defaults(llm=llm, system_prompt="Answer in one sentence.")
    prefilled = []
    for q in QUESTIONS:
        sim.reset()
        assert str(engine.chat(q)) == f"Echo: {q} — ok."
        assert sim.counter("kv_clears") == 0 and sim.counter("runs") == 1
        prefilled.append(sim.counter("prefilled_tokens"))
    assert max(prefilled[1:]) < 80  # each later turn prefills only its own question (and template tokens)
