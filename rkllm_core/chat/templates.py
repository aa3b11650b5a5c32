"""How a conversation becomes runtime input.

The runtime applies the model's own chat template to plain text and takes
only ``user`` and ``tool`` turns: it cannot be given an earlier assistant
message. When the conversation is already in the KV cache that does not
matter (only the new messages are sent). When it is not — a new process, a
different conversation, an edited history — the earlier turns must be rebuilt:

* **ChatML family** (Qwen 2/2.5/3, QwQ, MiniCPM, InternLM 2, SmolLM …): the
  template is known, so the engine installs it itself with
  ``rkllm_set_chat_template``: the *system slot* carries the system prompt, the
  tool declarations (Qwen's ``<tools>`` format) and every earlier turn rendered
  exactly as the model's template would (assistant tool calls as
  ``<tool_call>`` blocks, tool results as ``<tool_response>`` blocks). This is
  faithful. Thinking is controlled by the assistant header (an empty
  ``<think></think>`` block switches it off), since the runtime's
  ``enable_thinking`` stops working under a custom template.
* **Other families** (Gemma, Llama, DeepSeek-R1 …): their templates need BOS
  handling and conventions the runtime's own template gets right, so the
  engine keeps the built-in template (``rkllm_set_function_tools`` for the
  system prompt and tools; ``role="tool"`` for results; ``enable_thinking``
  native). Earlier turns that are not in the KV cache are appended to the
  system prompt as a plain transcript. This is a documented approximation:
  the model sees its earlier replies as quoted text, not as its own turns.

Token counts are estimated conservatively (more than the real count): one
token per 3 UTF-8 bytes plus a few per message. Real tokenizers average about
4 bytes per token for English and about 3 for Chinese, so the estimate errs on
the side of refusing or trimming early rather than overflowing the context.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..native.multimodal import IMAGE_TAG
from ..params import estimate_tokens
from .messages import ChatMessage

__all__ = [
    "CHATML",
    "ChatMLTemplate",
    "estimate_tokens",
    "render_transcript",
    "template_for_family",
]

TOOL_RESPONSE_TAG = "tool_response"

MESSAGE_OVERHEAD_TOKENS = 5


def plain(text: str) -> str:
    """A message's text with any literal ``<image>`` written ``[image]``: only an image stands for one."""
    return text.replace(IMAGE_TAG, "[image]")


def content_with_name(m: ChatMessage) -> str:
    """A message's text as the prompt shows it: one ``<image>`` per image first, then ``name: content``."""
    text = f"{m.name}: {m.content}" if m.name and m.role == "user" else m.content
    return IMAGE_TAG * len(m.images) + plain(text)


def _tool_call_json(name: str, arguments: object) -> str:
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ChatMLTemplate:
    """The ChatML layout used by Qwen and others, with Qwen's tool conventions."""

    name: str = "chatml"
    thinking: bool = False
    """Whether the model has a thinking mode (Qwen3): off means an empty think block."""

    def system_block(self, system: str, tools_json: Sequence[str]) -> str:
        """The system turn, with tool declarations when there are tools."""
        text = system
        if tools_json:
            text += (
                "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                + "\n".join(tools_json)
                + "\n</tools>\n\nFor each function call, return a json object with function name and "
                "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
            )
        return f"<|im_start|>system\n{text}<|im_end|>\n"

    def render_turns(self, messages: Sequence[ChatMessage]) -> str:
        """Earlier turns exactly as the model's template renders them."""
        out: list[str] = []
        i = 0
        while i < len(messages):
            m = messages[i]
            if m.role == "assistant":
                body = plain(m.content)
                for call in m.tool_calls:
                    body += (
                        "\n" if body else ""
                    ) + f"<tool_call>\n{_tool_call_json(call.name, dict(call.arguments))}\n</tool_call>"
                out.append(f"<|im_start|>assistant\n{body}<|im_end|>\n")
                i += 1
                continue
            # user and tool messages up to the next assistant turn form one user turn
            j = i
            while j < len(messages) and messages[j].role in ("user", "tool"):
                j += 1
            out.append(f"<|im_start|>user\n{self.user_text(messages[i:j])}<|im_end|>\n")
            i = j
        return "".join(out)

    def user_text(self, messages: Sequence[ChatMessage]) -> str:
        """The body of one user turn made of user messages and tool results."""
        parts = []
        for m in messages:
            if m.role == "tool":
                parts.append(f"<{TOOL_RESPONSE_TAG}>\n{plain(m.content)}\n</{TOOL_RESPONSE_TAG}>")
            else:
                parts.append(content_with_name(m))
        return "\n".join(parts)

    def prefix(self) -> str:
        """What the runtime puts before each new user turn."""
        return "<|im_start|>user\n"

    def postfix(self, enable_thinking: bool) -> str:
        """What follows each new user turn: the end of the turn and the assistant header."""
        tail = "<|im_end|>\n<|im_start|>assistant\n"
        if self.thinking and not enable_thinking:
            tail += "<think>\n\n</think>\n\n"
        return tail


CHATML = ChatMLTemplate()

_CHATML_FAMILIES = ("qwen", "qwq", "minicpm", "internlm", "smollm", "yi", "openlongcot-qwen")
_THINKING_FAMILIES = ("qwen3", "qwq")


def template_for_family(family: str | None) -> ChatMLTemplate | None:
    """The template the engine renders itself for a model family, or None to keep the built-in one."""
    if not family:
        return None
    f = family.lower()
    if f.startswith("deepseek"):  # DeepSeek-R1 distills use their own template even on Qwen bases
        return None
    if f.startswith(_CHATML_FAMILIES):
        return ChatMLTemplate(thinking=f.startswith(_THINKING_FAMILIES))
    return None


def render_transcript(messages: Sequence[ChatMessage]) -> str:
    """Earlier turns as a plain transcript (for models whose template the engine does not render)."""
    lines = ["Conversation so far:"]
    for m in messages:
        if m.role == "assistant":
            text = plain(m.content)
            for call in m.tool_calls:
                text += ("\n" if text else "") + f"[called {call.name} with {json.dumps(dict(call.arguments))}]"
            lines.append(f"Assistant: {text}")
        elif m.role == "tool":
            lines.append(f"Tool result: {plain(m.content)}")
        else:
            lines.append(f"User: {content_with_name(m)}")
    return "\n".join(lines)
