"""The runtime layer: a handle on one loaded model, its sessions and its runs."""

from .handle import Completion, KVState, RKLLMRuntime, Role, RunOptions, Session
from .run import RunStream

__all__ = ["Completion", "KVState", "RKLLMRuntime", "Role", "RunOptions", "RunStream", "Session"]
