"""``llama_index.embeddings.rkllm``: the LlamaIndex-style import path of :class:`llamaindex_rkllm.RKLLMEmbedding`.

``llama_index`` and ``llama_index.embeddings`` are namespace packages shared with
``llama-index-core`` and other integrations, so this distribution ships no
``__init__.py`` for them.
"""

from llamaindex_rkllm import RKLLMEmbedding

__all__ = ["RKLLMEmbedding"]
