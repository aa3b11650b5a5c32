"""LlamaIndex integration for the RKLLM runtime (``RKLLM``).

The LLM class lands on top of ``rkllm_core``'s chat engine; until then this
package only reserves the import name.
"""

__all__: list[str] = []
