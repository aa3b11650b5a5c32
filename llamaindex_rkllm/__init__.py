"""LlamaIndex integration for the RKLLM runtime: ``RKLLM``, a LlamaIndex LLM on the Rockchip NPU.

Install with ``pip install "boardllm[llamaindex]"``; also importable as
``llama_index.llms.rkllm``.

Example::

    from llama_index.core import Settings
    from llamaindex_rkllm import RKLLM

    Settings.llm = RKLLM(model="qwen3-0.6b")
"""

from llamaindex_rkllm.base import RKLLM

__all__ = ["RKLLM"]
