"""LangChain integration for the RKLLM runtime: ``ChatRKLLM``, ``RKLLMEmbeddings`` and ``RKLLMRerank``.

Each runs ``.rkllm`` models on the Rockchip NPU inside the Python process (or
on the bundled simulator when no ``librkllmrt.so`` is found), built on
``rkllm_core``:

* ``ChatRKLLM``: a chat model on the chat engine, so conversations reuse the
  KV cache across turns.
* ``RKLLMEmbeddings``: embeddings (``embed_documents``, ``embed_query`` and
  their async forms) from an embedding model such as Qwen3-Embedding, for
  vector stores and retrievers.
* ``RKLLMRerank``: a document compressor that reranks retrieved documents with
  a reranker model such as Qwen3-Reranker (``ContextualCompressionRetriever``).

Models are loaded on first use, not at construction, by a model manager that
can keep a chat model and an embedding model loaded together; each class
refuses a model of the wrong kind (``ModelKindError``) before loading it.
"""

from ._convert import UnsupportedContentError
from .chat_models import ChatRKLLM
from .embeddings import RKLLMEmbeddings
from .rerank import RKLLMRerank

__all__ = ["ChatRKLLM", "RKLLMEmbeddings", "RKLLMRerank", "UnsupportedContentError"]
