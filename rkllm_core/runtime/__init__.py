"""The runtime layer: a handle on one loaded model, its sessions and its runs."""

from .handle import Completion, KVState, RKLLMRuntime, Role, RunOptions, Session
from .run import RunStream
from .setup import ChatSetup, ChatTemplate, FunctionTools

__all__ = [
    "ChatSetup",
    "ChatTemplate",
    "Completion",
    "FunctionTools",
    "KVState",
    "RKLLMRuntime",
    "Role",
    "RunOptions",
    "RunStream",
    "Session",
]
