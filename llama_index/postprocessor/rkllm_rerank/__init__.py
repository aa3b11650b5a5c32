"""``llama_index.postprocessor.rkllm_rerank``: the LlamaIndex-style path of :class:`llamaindex_rkllm.RKLLMRerank`.

``llama_index`` and ``llama_index.postprocessor`` are namespace packages shared
with ``llama-index-core`` and other integrations, so this distribution ships no
``__init__.py`` for them.
"""

from llamaindex_rkllm import RKLLMRerank

__all__ = ["RKLLMRerank"]
