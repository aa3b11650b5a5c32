"""LlamaIndex integration for the RKLLM runtime: models on the Rockchip NPU, in-process.

* :class:`RKLLM`: an LLM (chat, completion, streaming, tool calling);
* :class:`RKLLMEmbedding`: an embedding model (documents and queries);
* :class:`RKLLMRerank`: a node postprocessor that reranks with a reranker model.

Install from a checkout with ``pip install -e ".[llamaindex]"``; also importable as
``llama_index.llms.rkllm``, ``llama_index.embeddings.rkllm`` and
``llama_index.postprocessor.rkllm_rerank``.

Example::

    from llama_index.core import Settings, VectorStoreIndex
    from llamaindex_rkllm import RKLLM, RKLLMEmbedding, RKLLMRerank

    Settings.llm = RKLLM(model="qwen3-0.6b", max_tokens=512)
    Settings.embed_model = RKLLMEmbedding(model_name="qwen3-embedding-0.6b")
    index = VectorStoreIndex.from_documents(documents)
    query_engine = index.as_query_engine(
        similarity_top_k=10, node_postprocessors=[RKLLMRerank(model="qwen3-reranker-0.6b", top_n=3)]
    )

Each class takes its model as the first argument, ``model=`` or ``model_name=``, else from
``RKLLM_MODEL``, ``RKLLM_EMBED_MODEL`` or ``RKLLM_RERANK_MODEL`` (as the LangChain classes
do; ``rkllm models`` lists the names). Ollama's ``request_timeout`` is ``timeout``, and the
LLM's ``max_tokens`` is ``max_new_tokens``.
"""

from llamaindex_rkllm.base import RKLLM
from llamaindex_rkllm.embeddings import RKLLMEmbedding
from llamaindex_rkllm.postprocessor import RKLLMRerank

__all__ = ["RKLLM", "RKLLMEmbedding", "RKLLMRerank"]
