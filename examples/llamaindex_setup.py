"""Shared set-up for the LlamaIndex examples: the runtime (NPU or simulator), the model, an embedding.

On a board, the examples use ``librkllmrt.so`` and your ``.rkllm`` models (see the README).
Without the runtime they say loudly that they run on the **simulator** (like
``examples/quickstart.py``), build it, and create a demo model file, so they run on any
laptop. Simulated answers are deterministic echoes of the prompt, not real answers.

Environment:
    RKLLM_LIB_PATH     the runtime library (default: the usual locations, else the simulator)
    RKLLM_MODEL_DIR    where ``.rkllm`` files are (default: ./models, ~/.local/share/rkllm/models)
    RKLLM_MODEL        which model to use (default: the first one found)
    RKLLM_EMBED_MODEL  a local folder with a sentence-transformers model for embeddings
                       (default: a small keyword embedding, offline, good enough for a demo)
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent

from llamaindex_rkllm import RKLLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import setup  # noqa: E402  (runtime and model selection shared by the examples)

DATA_DIR = Path(__file__).resolve().parent / "data"


def make_llm(**settings: Any) -> tuple[RKLLM, bool]:
    """Return an ``RKLLM`` for the model to use, and whether the runtime is the simulator."""
    env = setup()  # picks the runtime (loudly when simulated) and a model, as every example does
    llm = RKLLM(model=env.model, library_path=env.library_path, model_dir=os.environ.get("RKLLM_MODEL_DIR"), **settings)
    info = llm.manager.resolve(env.model)
    print(f"model: {info.name} ({info.filename}, context {info.context_size})")
    return llm, env.simulated


# ------------------------------------------------------------------------------------ embeddings

_WORD = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*")
_STOP = frozenset(
    "a an and are as at be by can does for from has have how in is it its of on one or the this to was what "
    "which with".split()
)


class KeywordEmbedding(BaseEmbedding):
    """A tiny, offline bag-of-words embedding (hashed words, L2-normalised).

    Good enough to retrieve the right file out of a handful in a demo, with no model to
    download. Use a real embedding model for real work (see ``embed_model``).
    """

    dim: int = 256

    @classmethod
    def class_name(cls) -> str:
        """Name used by LlamaIndex for serialisation."""
        return "KeywordEmbedding"

    def _vector(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in _WORD.findall(text.lower()):
            if word not in _STOP:
                bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
                vec[bucket % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)


def embed_model() -> BaseEmbedding:
    """The embedding model: a local sentence-transformers folder if configured, else ``KeywordEmbedding``.

    On a board, a real embedding model runs on the CPU next to the LLM on the NPU::

        pip install llama-index-embeddings-huggingface     # pulls sentence-transformers and torch (CPU)
        # copy a model folder to the board once, e.g. BAAI/bge-small-en-v1.5 (130 MB), then:
        export HF_HUB_OFFLINE=1                             # never try to download anything
        export RKLLM_EMBED_MODEL=/opt/models/bge-small-en-v1.5
    """
    folder = os.environ.get("RKLLM_EMBED_MODEL")
    if folder:
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding  # type: ignore[import-not-found]

        print(f"embeddings: {folder} (sentence-transformers, CPU)")
        return HuggingFaceEmbedding(model_name=folder, device="cpu")  # type: ignore[no-any-return]
    print("embeddings: KeywordEmbedding (offline demo; set RKLLM_EMBED_MODEL for a real model)")
    return KeywordEmbedding()


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
