"""LangChain integration for the RKLLM runtime: ``ChatRKLLM``.

``ChatRKLLM`` is a LangChain chat model that runs ``.rkllm`` models on the
Rockchip NPU inside the Python process (or on the bundled simulator when no
``librkllmrt.so`` is found). It is built on ``rkllm_core``'s chat engine, so
conversations reuse the KV cache across turns.
"""

from ._convert import UnsupportedContentError
from .chat_models import ChatRKLLM

__all__ = ["ChatRKLLM", "UnsupportedContentError"]
