"""The runtime layer: a handle on one loaded model, its sessions and its runs."""

from .batch import FILLER_PROMPT, BatchInput, BatchRun, BatchSlot
from .handle import Completion, KVState, RKLLMRuntime, Role, RunOptions, Session
from .run import RunStream
from .setup import ChatSetup, ChatTemplate, FunctionTools

__all__ = [
    "FILLER_PROMPT",
    "BatchInput",
    "BatchRun",
    "BatchSlot",
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
