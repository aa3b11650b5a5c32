"""LlamaIndex integration for the RKLLM runtime: models on the Rockchip NPU, in-process.

* :class:`RKLLM`: an LLM (chat, completion, streaming, tool calling);
* :class:`RKLLMEmbedding`: an embedding model (documents and queries);
* :class:`RKLLMRerank`: a node postprocessor that reranks with a reranker model.

Install with ``pip install "boardllm[llamaindex]"``; also importable as
``llama_index.llms.rkllm``, ``llama_index.embeddings.rkllm`` and
``llama_index.postprocessor.rkllm_rerank``.

Example::

    from llama_index.core import VectorStoreIndex
    from llamaindex_rkllm import RKLLM, RKLLMEmbedding, RKLLMRerank

    index = VectorStoreIndex.from_documents(documents, embed_model=RKLLMEmbedding(model="qwen3-embedding-0.6b"))
    query_engine = index.as_query_engine(
        llm=RKLLM(model="qwen3-0.6b"),
        similarity_top_k=10,
        node_postprocessors=[RKLLMRerank(model="qwen3-reranker-0.6b", top_n=3)],
    )
"""

from llamaindex_rkllm.base import RKLLM
from llamaindex_rkllm.embeddings import RKLLMEmbedding
from llamaindex_rkllm.postprocessor import RKLLMRerank

__all__ = ["RKLLM", "RKLLMEmbedding", "RKLLMRerank"]
