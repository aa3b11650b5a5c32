"""Shared set-up for the LlamaIndex examples: the runtime (NPU or simulator), the LLM, embeddings, reranker.

On a board, the examples use ``librkllmrt.so`` and your ``.rkllm`` models (see docs/board.md).
Without the runtime they say loudly that they run on the **simulator** (like
``examples/quickstart.py``), build it, and create a demo model file, so they run on any
laptop. Simulated answers are deterministic echoes of the prompt, not real answers.

Environment:
    RKLLM_LIB_PATH     the runtime library (default: the usual locations, else the simulator)
    RKLLM_MODEL_DIR    where ``.rkllm`` files are (default: ./models, ~/.local/share/rkllm/models)
    RKLLM_MODEL        which model to use (default: the first chat model found)
    RKLLM_EMBED_MODEL  the embedding model (default: the first .rkllm of kind embedding)
    RKLLM_RERANK_MODEL the reranker (default: the first .rkllm of kind reranker)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from llama_index.core import Document, SimpleDirectoryReader
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent

from llamaindex_rkllm import RKLLM, RKLLMEmbedding, RKLLMRerank
from rkllm_core.models.manager import ModelManager
from rkllm_core.models.registry import ModelRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import rag_models, setup  # noqa: E402  (runtime and model selection shared by the examples)

_RAG: list[str] = []  # the embedding model and reranker make_llm(rag=True) found

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_documents(data_dir: Path = DATA_DIR) -> list[Document]:
    """The ``.txt`` files of ``data_dir`` as documents whose chunks are their text alone.

    ``SimpleDirectoryReader`` writes each file's absolute path (metadata ``file_path``) into the
    text that is embedded and into the text the LLM is given. That text then depends on where the
    files happen to be: in another folder the splitter cuts other chunks (it leaves room for the
    metadata in each chunk), other passages are retrieved, and the prompt, which also spends
    tokens on a path the model cannot use, changes. Here neither the embedding nor the LLM sees
    the metadata; it stays on the nodes (``node.metadata["file_name"]``) to show the sources.
    """
    documents = SimpleDirectoryReader(str(data_dir), required_exts=[".txt"]).load_data()
    for doc in documents:
        doc.excluded_embed_metadata_keys = list(doc.metadata)
        doc.excluded_llm_metadata_keys = list(doc.metadata)
    return documents


def make_llm(*, rag: bool = False, **settings: Any) -> tuple[RKLLM, bool]:
    """Return an ``RKLLM`` for the model to use, and whether the runtime is the simulator.

    The LLM has a model manager of its own that keeps up to three models loaded; close it with
    ``llm.manager.close()``. With ``rag=True`` the embedding model and reranker are found first
    (demo ones are created on the simulator), for :func:`embed_model` and :func:`reranker`.
    """
    env = setup()  # picks the runtime (loudly when simulated) and a model, as every example does
    if rag:
        _RAG[:] = rag_models(env)
    manager = ModelManager(ModelRegistry(), library=env.library_path, max_loaded=3)
    llm = RKLLM(model=env.model, manager=manager, **settings)
    info = llm.manager.resolve(env.model)
    print(f"model: {info.name} ({info.filename}, context {info.context_size})")
    return llm, env.simulated


# ------------------------------------------------------------------------------------ embeddings


def embed_model(llm: RKLLM) -> RKLLMEmbedding:
    """An embedding model on the NPU, on the LLM's manager (a demo one on the simulator, if needed)."""
    if not _RAG:
        raise RuntimeError("call make_llm(rag=True) first")
    return RKLLMEmbedding(_RAG[0], manager=llm.manager)


def reranker(llm: RKLLM, top_n: int = 2) -> RKLLMRerank:
    """A reranker on the NPU, on the LLM's manager (a demo one on the simulator, if needed)."""
    if not _RAG:
        raise RuntimeError("call make_llm(rag=True) first")
    return RKLLMRerank(_RAG[1], manager=llm.manager, top_n=top_n)


# ------------------------------------------------------------------------------------ usage


class UsageRecorder(BaseEventHandler):
    """Records ``raw`` (usage, KV-cache reuse, finish reason) of every LLM call LlamaIndex makes."""

    calls: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        """Name used by LlamaIndex's instrumentation."""
        return "UsageRecorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        """Keep the raw dict of each finished chat or completion."""
        if isinstance(event, LLMChatEndEvent | LLMCompletionEndEvent) and event.response is not None:
            raw = event.response.raw
            if isinstance(raw, dict) and "usage" in raw:
                self.calls.append(raw)

    def take(self) -> list[dict[str, Any]]:
        """The calls recorded since the last ``take``."""
        calls, self.calls = self.calls, []
        return calls

    @classmethod
    def install(cls) -> UsageRecorder:
        """Attach a recorder to LlamaIndex's root dispatcher and return it."""
        recorder = cls()
        get_dispatcher().add_event_handler(recorder)
        return recorder


def describe(calls: list[dict[str, Any]]) -> str:
    """One line per LLM call: prefilled tokens, context size, whether the KV cache was reused."""
    parts = []
    for raw in calls:
        u = raw["usage"]
        if raw["kv_reused"]:
            how = "KV cache reused"
        elif u["cached_tokens"]:
            how = f"rebuilt, {u['cached_tokens']} from the prompt cache"
        else:
            how = "rebuilt"
        parts.append(f"{u['prefilled_tokens']} of {u['prompt_tokens']} prompt tokens prefilled ({how})")
    return "; ".join(parts)
