"""What to send for a chat request: reuse the KV cache, or rebuild the conversation.

The decision reads the handle's own account of its KV cache
(:class:`~rkllm_core.runtime.KVState`), taken inside the request's session, so it
is right whoever used the handle before — another engine, an adapter, a direct
``generate()``:

* **Reuse** when the cache's tag says it holds exactly this conversation's
  setup (system prompt, tools, template, thinking) and every earlier turn,
  including the reply the model produced, and the new input still fits: only
  the new user / tool messages are sent, with ``keep_history=1``.
* **Rebuild** otherwise: clear the cache, install the template (see
  :mod:`.templates`), and send the history with the new input. If the
  conversation does not fit, the oldest turns are dropped (the system prompt
  and the newest input always stay); if even that cannot fit,
  :class:`~rkllm_core.errors.ContextLengthError`. A fresh conversation with a
  long system prompt loads that prefill from the prompt cache on disk, or
  saves it there for next time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ContextLengthError
from ..models.registry import ModelInfo
from ..params import check_text
from ..runtime import ChatSetup, ChatTemplate, FunctionTools, KVState
from .messages import ChatMessage
from .options import ChatOptions, normalise_tools
from .templates import MESSAGE_OVERHEAD_TOKENS, ChatMLTemplate, estimate_tokens, render_transcript, template_for_family

if TYPE_CHECKING:
    from .promptcache import CacheKey, PromptCacheStore

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_OUTPUT_RESERVE", "DEFAULT_SYSTEM_PROMPT", "PROMPT_CACHE_MIN_TOKENS", "Plan", "Planner", "kv_tag"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_OUTPUT_RESERVE = 256
"""Tokens kept free for the answer when ``max_new_tokens`` is not set."""
PROMPT_CACHE_MIN_TOKENS = 64
"""System prompts estimated shorter than this are not worth a cache file."""

Fingerprint = tuple[Any, ...]


def kv_tag(setup_key: tuple[Any, ...], fingerprints: Sequence[Fingerprint]) -> Hashable:
    """The tag a session declares for a KV cache holding ``fingerprints`` under ``setup_key``."""
    return ("chat", setup_key, tuple(fingerprints))


@dataclass
class Plan:
    """What one request sends, and what the KV cache holds once it has been prefilled."""

    reuse: bool
    prompt: str
    role: Literal["user", "tool"]
    enable_thinking: bool
    native: bool
    """The runtime's built-in template is in use (thinking is then its ``enable_thinking`` switch)."""
    setup: ChatSetup | None
    """What to install on a rebuild (a chat template or function tools); ``None`` when reusing."""
    setup_key: tuple[Any, ...]
    kv_after: tuple[Fingerprint, ...]
    kv_before: int = 0
    """Positions already in the cache when reusing."""
    cache_key: CacheKey | None = None
    cache_load: Path | None = None
    cache_save: Path | None = None
    dropped_turns: int = 0

    def tag_after(self, reply: ChatMessage) -> Hashable:
        """The KV tag once the model's ``reply`` follows the input."""
        return kv_tag(self.setup_key, (*self.kv_after, reply.fingerprint()))


class Planner:
    """Decides reuse or rebuild, renders the prompt, and looks up the prompt cache.

    Args:
        store: the system-prompt cache on disk, or ``None``.
        prompt_cache_min_tokens: smallest (estimated) system prompt worth caching.
        reuse_kv: reuse the KV cache between requests (off only to measure what that saves).
    """

    def __init__(self, store: PromptCacheStore | None, *, prompt_cache_min_tokens: int, reuse_kv: bool) -> None:
        self.store = store
        self.prompt_cache_min_tokens = prompt_cache_min_tokens
        self.reuse_kv = reuse_kv

    def plan(
        self,
        kv: KVState,
        limit: int,
        runtime_id: tuple[str, str],
        info: ModelInfo,
        msgs: Sequence[ChatMessage],
        opts: ChatOptions,
    ) -> Plan:
        """Plan one request.

        Args:
            kv: the handle's KV state, read inside the request's session.
            limit: the handle's context size.
            runtime_id: (ABI, runtime version): part of a prompt cache's key.
            info: the model.
            msgs: the validated conversation (ending with a user or tool message).
            opts: the request's options.

        Raises:
            ContextLengthError: the system prompt and the newest input cannot fit.
        """
        tools_json = normalise_tools(opts.active_tools) if opts.active_tools else ""
        system = "\n\n".join(m.content for m in msgs if m.role == "system") or (
            info.defaults.system_prompt or DEFAULT_SYSTEM_PROMPT
        )
        turns = [m for m in msgs if m.role != "system"]
        last_assistant = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=-1)
        history, inputs = turns[: last_assistant + 1], turns[last_assistant + 1 :]
        custom = info.defaults.chat_template
        template = template_for_family(info.facts.family) if custom is None else None
        if tools_json:
            custom = None  # tools take the runtime's function-calling set-up, which brings its own template
        elif custom is not None and "{system}" not in custom[0] and not info.defaults.system_prompt:
            system = "\n\n".join(m.content for m in msgs if m.role == "system")  # the template's own, or the request's
        thinking = bool(opts.enable_thinking)
        kind = template.name if template else ("custom", *custom) if custom else "native"
        setup_key = (kind, system, tools_json, thinking if template else None)
        reserve = opts.max_new_tokens or DEFAULT_OUTPUT_RESERVE
        prompt, role = _render_inputs(template, inputs, opts)
        input_tokens = estimate_tokens(prompt) + MESSAGE_OVERHEAD_TOKENS * len(inputs)
        fingerprints = [m.fingerprint() for m in history]
        kv_after = (*fingerprints, *(m.fingerprint() for m in inputs))
        if (
            self.reuse_kv
            and kv.tag is not None
            and kv.tag == kv_tag(setup_key, fingerprints)
            and kv.tokens is not None
            and kv.tokens + input_tokens + reserve <= limit
        ):
            return Plan(True, prompt, role, thinking, template is None, None, setup_key, kv_after, kv_before=kv.tokens)

        # Rebuild: drop the oldest turns until the rendered conversation fits.
        dropped = 0
        while True:
            setup = _setup_for(template, system, tools_json, thinking, history, custom)
            needed = estimate_tokens("".join(setup.parts)) + input_tokens + reserve
            if needed <= limit or not history:
                break
            cut = next((i for i in range(1, len(history)) if history[i].role == "user"), len(history))
            history = history[cut:]
            dropped += cut
        for part, what in zip(setup.parts, ("system prompt", "template prefix", "template postfix"), strict=True):
            check_text(part, f"the rendered {what}")  # before anything touches the handle
        if needed > limit:
            raise ContextLengthError(
                f"the prompt needs about {needed - reserve} tokens plus {reserve} for the answer, more than the "
                f"{limit}-token context of {info.name}; shorten the system prompt or the last message, or lower "
                "max_new_tokens",
                requested=needed,
                limit=limit,
            )
        if dropped:
            logger.info("conversation too long for %s: rebuilt without its %d oldest messages", info.name, dropped)
        plan = Plan(
            False,
            prompt,
            role,
            thinking,
            template is None,
            setup,
            setup_key,
            (*(m.fingerprint() for m in history), *(m.fingerprint() for m in inputs)),
            dropped_turns=dropped,
        )
        if self.store is not None and not history and estimate_tokens(setup.system) >= self.prompt_cache_min_tokens:
            # The prompt cache is an optimisation: any trouble with it (logged by the store) is a miss.
            key = self.store.try_key(
                info.path,
                setup=setup.cache_text,
                abi=runtime_id[0],
                runtime=runtime_id[1],
                thinking=str(thinking),
            )
            if key is not None:
                plan.cache_key = key
                plan.cache_load = self.store.lookup(key)
                if plan.cache_load is None:
                    plan.cache_save = self.store.staging_path(key)
        return plan


def _setup_for(
    template: ChatMLTemplate | None,
    system: str,
    tools_json: str,
    thinking: bool,
    history: Sequence[ChatMessage],
    custom: tuple[str, str, str] | None = None,
) -> ChatSetup:
    """The template call that starts the conversation: earlier turns go into the system slot.

    ``custom`` is a model's own ``(system, prefix, postfix)`` from the registry file:
    ``{system}`` in its system text stands for the conversation's system prompt (and
    earlier turns); without it they follow the template's system text.
    """
    if template is not None:
        tools_list = (
            [json.dumps(t, ensure_ascii=False, sort_keys=True) for t in json.loads(tools_json)] if tools_json else []
        )
        slot = template.system_block(system, tools_list) + template.render_turns(history)
        return ChatTemplate(slot, template.prefix(), template.postfix(thinking))
    slot = "\n\n".join(part for part in (system, render_transcript(history) if history else "") if part)
    if custom is not None:
        head, prefix, postfix = custom
        text = head.replace("{system}", slot) if "{system}" in head else head + slot
        return ChatTemplate(text, prefix, postfix)
    return FunctionTools(slot, tools_json or "[]", "tool_response")


def _render_inputs(
    template: ChatMLTemplate | None, inputs: Sequence[ChatMessage], opts: ChatOptions
) -> tuple[str, Literal["user", "tool"]]:
    names = list(opts.tool_names()) if opts.active_tools else []
    force = ""
    if opts.forces_tool_call and names:
        force = "\n\nAnswer by calling one of the tools: " + ", ".join(names) + "."
    elif opts.tool_choice and opts.tool_choice in names:
        force = f"\n\nAnswer by calling the tool `{opts.tool_choice}`."
    if template is not None:
        return template.user_text(inputs) + force, "user"
    if all(m.role == "tool" for m in inputs) and not force:
        results = [_json_or_text(m.content) for m in inputs]
        return json.dumps(results, ensure_ascii=False), "tool"
    parts = [
        f"<tool_response>\n{m.content}\n</tool_response>"
        if m.role == "tool"
        else (f"{m.name}: {m.content}" if m.name else m.content)
        for m in inputs
    ]
    return "\n\n".join(parts) + force, "user"


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
