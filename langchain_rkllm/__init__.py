"""LangChain integration for the RKLLM runtime (``ChatRKLLM``).

The chat model lands on top of ``rkllm_core``'s chat engine; until then this
package only reserves the import name.
"""

__all__: list[str] = []
