"""``llama_index.llms.rkllm``: the LlamaIndex-style import path of :class:`llamaindex_rkllm.RKLLM`.

``llama_index`` and ``llama_index.llms`` are namespace packages shared with
``llama-index-core`` and other integrations, so this distribution ships no
``__init__.py`` for them.
"""

from llamaindex_rkllm import RKLLM

__all__ = ["RKLLM"]
