"""The runtime layer: a handle on one loaded model and its runs (worker thread, queue, abort, close)."""

from .handle import Completion, RKLLMRuntime, Role, RunOptions, RunStream

__all__ = ["Completion", "RKLLMRuntime", "Role", "RunOptions", "RunStream"]
