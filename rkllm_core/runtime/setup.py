"""What a conversation installs on a handle before it starts: a chat template or function tools.

A chat setup is a small frozen value. The planner decides which one a
conversation needs, the session records the one installed last
(:attr:`~rkllm_core.runtime.Session.chat_setup`), and the value installs itself
on a session, so no tuple of loosely named strings crosses modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

__all__ = ["ChatSetup", "ChatTemplate", "FunctionTools"]


class Installer(Protocol):
    """What a set-up installs itself on: a :class:`~rkllm_core.runtime.Session` (or anything alike)."""

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        """``rkllm_set_chat_template``."""

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        """``rkllm_set_function_tools``."""


class _Setup:
    """What both set-ups share: their three strings, and the key text built from them."""

    __slots__ = ()
    _kind: ClassVar[str]

    @property
    def parts(self) -> tuple[str, str, str]:
        """The three strings, in the order the runtime takes them."""
        raise NotImplementedError

    @property
    def cache_text(self) -> str:
        """The setup as one string, part of a prompt-cache key."""
        return "\x1f".join((self._kind, *self.parts))


@dataclass(frozen=True, slots=True)
class ChatTemplate(_Setup):
    """``rkllm_set_chat_template``: literal strings around every input (you supply special tokens).

    Attributes:
        system: the text before the conversation (the system block, and earlier turns on a rebuild).
        prefix: put before each input.
        postfix: put after each input (where the model's answer starts).
    """

    system: str
    prefix: str
    postfix: str
    _kind: ClassVar[str] = "template"

    @property
    def parts(self) -> tuple[str, str, str]:
        """The three strings, in the order the runtime takes them."""
        return (self.system, self.prefix, self.postfix)

    def install(self, session: Installer) -> None:
        """Install on ``session``'s handle."""
        session.set_chat_template(*self.parts)


@dataclass(frozen=True, slots=True)
class FunctionTools(_Setup):
    """``rkllm_set_function_tools``: a system prompt and tool definitions, with the runtime's own template.

    Attributes:
        system: the system prompt (and earlier turns on a rebuild).
        tools_json: the tools as a JSON array.
        response_tag: the tag tool results are wrapped in.
    """

    system: str
    tools_json: str
    response_tag: str = "tool_response"
    _kind: ClassVar[str] = "tools"

    @property
    def parts(self) -> tuple[str, str, str]:
        """The three strings, in the order the runtime takes them."""
        return (self.system, self.tools_json, self.response_tag)

    def install(self, session: Installer) -> None:
        """Install on ``session``'s handle."""
        session.set_function_tools(*self.parts)


ChatSetup = ChatTemplate | FunctionTools
"""Either set-up a conversation starts from."""
