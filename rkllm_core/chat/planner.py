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

**Images.** A user message's images stand before its text, one ``<image>`` each
(:mod:`.templates`); each counts ``image_tokens`` in the context budget (the encoder's
geometry). Only a run's own prompt carries images, never the installed template, so a
rebuild whose earlier turns hold images replays those turns in the prompt (after the
template's prefix) instead of the system slot; :attr:`Plan.images` lists the images the
run sends, in prompt order. The KV tag names the images of every message (their
fingerprints), and reuse also needs the handle's :attr:`~rkllm_core.runtime.KVState.images`
to hold the earlier turns' image digests: a follow-up turn prefills only its new input, not
the images already in the cache. A fresh conversation's prompt-cache key includes its images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ContextLengthError
from ..models.registry import ModelInfo
from ..params import check_text
from ..runtime import ChatSetup, ChatTemplate, FunctionTools, KVState
from .messages import ChatMessage, ImagePart
from .options import ChatOptions, normalise_tools
from .templates import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatMLTemplate,
    content_with_name,
    estimate_tokens,
    plain,
    render_transcript,
    template_for_family,
)

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
    """Continue the conversation in the KV cache (send only the new input, keep the cache)."""
    prompt: str
    """The text of this run: the new input, rendered for the template in use."""
    role: Literal["user", "tool"]
    """The role the runtime is told the input has (``tool`` for bare tool results on the built-in template)."""
    enable_thinking: bool
    """Whether the reply may think first."""
    native: bool
    """The runtime's built-in template (or the model's registry template) wraps the input; thinking is
    then the runtime's ``enable_thinking`` switch."""
    setup: ChatSetup | None
    """What to install on a rebuild (a chat template or function tools); ``None`` when reusing."""
    setup_key: tuple[Any, ...]
    """What the setup depends on (template, system prompt, tools, thinking): part of every KV tag."""
    kv_after: tuple[Fingerprint, ...]
    """The fingerprints of the messages the cache holds once the input is prefilled."""
    kv_before: int = 0
    """Positions already in the cache when reusing."""
    cache_key: CacheKey | None = None
    """The prompt-cache key of a fresh conversation's system prompt (``None``: not cached)."""
    cache_load: Path | None = None
    """A prompt-cache file to load before the run (a hit)."""
    cache_save: Path | None = None
    """Where the run saves its prefill for next time (a miss)."""
    dropped_turns: int = 0
    """Oldest messages left out so the conversation fits the context."""
    images: tuple[ImagePart, ...] = ()
    """The images this run sends, in the order of their ``<image>`` tags in :attr:`prompt`."""
    image_run: dict[str, Any] = field(default_factory=dict)
    """The run's image arguments (embeddings, size, tags, digests), set by the engine."""

    def tag_after(self, reply: ChatMessage) -> Hashable:
        """The KV tag once the model's ``reply`` follows the input."""
        return kv_tag(self.setup_key, (*self.kv_after, reply.fingerprint()))


@dataclass
class _Request:
    """One request taken apart: what the planner's steps share."""

    system: str
    history: list[ChatMessage]
    inputs: list[ChatMessage]
    template: ChatMLTemplate | None
    custom: tuple[str, str, str] | None
    tools_json: str
    thinking: bool
    setup_key: tuple[Any, ...]
    prompt: str
    role: Literal["user", "tool"]
    input_tokens: int
    reserve: int
    image_tokens: int = 0

    @property
    def input_images(self) -> tuple[ImagePart, ...]:
        return _images_of(self.inputs)

    @property
    def native(self) -> bool:
        return self.template is None


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
        *,
        image_tokens: int = 0,
        digests: Mapping[str, str] | None = None,
    ) -> Plan:
        """Plan one request: reuse the cache if it holds this conversation, else rebuild it.

        Args:
            kv: the handle's KV state, read inside the request's session.
            limit: the handle's context size.
            runtime_id: (ABI, runtime version): part of a prompt cache's key.
            info: the model.
            msgs: the validated conversation (ending with a user or tool message).
            opts: the request's options.
            image_tokens: tokens one image takes (the encoder's ``n_tokens``).
            digests: the content digest of each image, by :meth:`ImagePart.key`; what the handle's
                :attr:`~rkllm_core.runtime.KVState.images` must hold for a reuse.

        Raises:
            ContextLengthError: the system prompt and the newest input cannot fit.
        """
        req = _take_apart(info, msgs, opts, image_tokens)
        fingerprints = [m.fingerprint() for m in req.history]
        if (
            self.reuse_kv
            and _cache_continues(kv, kv_tag(req.setup_key, fingerprints), req, limit)
            and _holds_images(kv, req.history, digests or {})
        ):
            assert kv.tokens is not None
            kv_after = (*fingerprints, *(m.fingerprint() for m in req.inputs))
            return Plan(
                True,
                req.prompt,
                req.role,
                req.thinking,
                req.native,
                None,
                req.setup_key,
                kv_after,
                kv.tokens,
                images=req.input_images,
            )
        return self._rebuild(req, limit, runtime_id, info)

    def _rebuild(self, req: _Request, limit: int, runtime_id: tuple[str, str], info: ModelInfo) -> Plan:
        """A rebuild that fits; a fresh conversation's long system prompt goes through the prompt cache."""
        setup, history, dropped, carried = _fit(req, limit, info.name)
        plan = Plan(
            False,
            carried + req.prompt,
            req.role,
            req.thinking,
            req.native,
            setup,
            req.setup_key,
            (*(m.fingerprint() for m in history), *(m.fingerprint() for m in req.inputs)),
            dropped_turns=dropped,
            images=(_images_of(history) if carried else ()) + req.input_images,
        )
        if not history:
            self._look_up_prompt_cache(plan, setup, info, runtime_id)
        return plan

    def plan_batched(self, limit: int, info: ModelInfo, msgs: Sequence[ChatMessage], opts: ChatOptions) -> Plan:
        """Plan a request for a batched run: always a rebuild, and no prompt cache.

        The chat setup is installed once per handle for every slot of a run, so it is what
        requests must share to share a run. With a ChatML template the earlier turns go into
        the prompt instead of the setup (an empty prefix; the same text reaches the model), so
        conversations that share a system prompt and tools share runs whatever their history.

        Raises:
            ContextLengthError: the system prompt and the newest input cannot fit.
        """
        req = _take_apart(info, msgs, opts)
        setup, history, dropped, _ = _fit(req, limit, info.name)
        prompt = req.prompt
        if req.template is not None and history:
            tools = _tools_list(req.tools_json)
            setup = ChatTemplate(req.template.system_block(req.system, tools), "", req.template.postfix(req.thinking))
            prompt = req.template.render_turns(history) + req.template.prefix() + req.prompt
        kv_after = (*(m.fingerprint() for m in history), *(m.fingerprint() for m in req.inputs))
        return Plan(
            False, prompt, req.role, req.thinking, req.native, setup, req.setup_key, kv_after, dropped_turns=dropped
        )

    def _look_up_prompt_cache(self, plan: Plan, setup: ChatSetup, info: ModelInfo, runtime_id: tuple[str, str]) -> None:
        """A fresh conversation with a long system prompt loads its prefill from disk, or saves it there."""
        if self.store is None or estimate_tokens(setup.system) < self.prompt_cache_min_tokens:
            return
        images = [image.key() for image in plan.images]
        if any(not key.startswith("sha256:") for key in images):
            return  # a URL does not name its content: a saved prefill could hold another image
        # The prompt cache is an optimisation: any trouble with it (logged by the store) is a miss.
        extra = {"images": ",".join(images)} if images else {}
        key = self.store.try_key(
            info.path,
            setup=setup.cache_text,
            abi=runtime_id[0],
            runtime=runtime_id[1],
            thinking=str(plan.enable_thinking),
            **extra,
        )
        if key is not None:
            plan.cache_key = key
            plan.cache_load = self.store.lookup(key)
            if plan.cache_load is None:
                plan.cache_save = self.store.staging_path(key)


def _images_of(messages: Sequence[ChatMessage]) -> tuple[ImagePart, ...]:
    """The images of ``messages`` in prompt order."""
    return tuple(image for m in messages for image in m.images)


def _holds_images(kv: KVState, history: Sequence[ChatMessage], digests: Mapping[str, str]) -> bool:
    """The handle's cache holds the earlier turns' images (by content digest), in order."""
    wanted = _images_of(history)
    if not wanted and not kv.images:
        return True
    return kv.images == tuple(digests.get(image.key(), "") for image in wanted)


def _take_apart(info: ModelInfo, msgs: Sequence[ChatMessage], opts: ChatOptions, image_tokens: int = 0) -> _Request:
    """System prompt, earlier turns and new input; the template; the rendered input and its size."""
    tools_json = normalise_tools(opts.active_tools) if opts.active_tools else ""
    system = "\n\n".join(m.content for m in msgs if m.role == "system") or (
        info.defaults.system_prompt or DEFAULT_SYSTEM_PROMPT
    )
    turns = [m for m in msgs if m.role != "system"]
    last_assistant = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=-1)
    custom = info.defaults.chat_template
    template = template_for_family(info.facts.family) if custom is None else None
    if tools_json:
        custom = None  # tools take the runtime's function-calling set-up, which brings its own template
    elif custom is not None and "{system}" not in custom[0] and not info.defaults.system_prompt:
        system = "\n\n".join(m.content for m in msgs if m.role == "system")  # the template's own, or the request's
    thinking = bool(opts.enable_thinking)
    kind = template.name if template else ("custom", *custom) if custom else "native"
    inputs = turns[last_assistant + 1 :]
    prompt, role = _render_inputs(template, inputs, opts)
    return _Request(
        system=system,
        history=turns[: last_assistant + 1],
        inputs=inputs,
        template=template,
        custom=custom,
        tools_json=tools_json,
        thinking=thinking,
        setup_key=(kind, system, tools_json, thinking if template else None),
        prompt=prompt,
        role=role,
        input_tokens=estimate_tokens(prompt)
        + MESSAGE_OVERHEAD_TOKENS * len(inputs)
        + image_tokens * len(_images_of(inputs)),
        reserve=opts.max_new_tokens or DEFAULT_OUTPUT_RESERVE,
        image_tokens=image_tokens,
    )


def _cache_continues(kv: KVState, wanted: Hashable, req: _Request, limit: int) -> bool:
    """The cache holds exactly this conversation so far, and the new input (and answer) still fit."""
    if kv.tag is None or kv.tag != wanted or kv.tokens is None:
        return False
    return kv.tokens + req.input_tokens + req.reserve <= limit


def _fit(req: _Request, limit: int, model: str) -> tuple[ChatSetup, list[ChatMessage], int, str]:
    """The setup of a rebuild that fits: drop the oldest turns until it does (else ``ContextLengthError``).

    Returns:
        The setup to install, the earlier turns it replays, how many messages were dropped, and the
        text that carries the earlier turns in the prompt when they hold images (else empty).
    """
    history, dropped = req.history, 0
    while True:
        carried = _carried_turns(req.template, history) if _images_of(history) else ""
        replayed = [] if carried else history
        setup = _setup_for(req.template, req.system, req.tools_json, req.thinking, replayed, req.custom)
        needed = estimate_tokens("".join(setup.parts)) + req.input_tokens + req.reserve
        if carried:
            needed += estimate_tokens(carried) + req.image_tokens * len(_images_of(history))
        if needed <= limit or not history:
            break
        cut = next((i for i in range(1, len(history)) if history[i].role == "user"), len(history))
        history = history[cut:]
        dropped += cut
    for part, what in zip(setup.parts, ("system prompt", "template prefix", "template postfix"), strict=True):
        check_text(part, f"the rendered {what}")  # before anything touches the handle
    if needed > limit:
        raise ContextLengthError(
            f"the prompt needs about {needed - req.reserve} tokens plus {req.reserve} for the answer, more than the "
            f"{limit}-token context of {model}; shorten the system prompt or the last message, or lower "
            "max_new_tokens",
            requested=needed,
            limit=limit,
        )
    if dropped:
        logger.info("conversation too long for %s: rebuilt without its %d oldest messages", model, dropped)
    return setup, history, dropped, carried


def _carried_turns(template: ChatMLTemplate | None, history: Sequence[ChatMessage]) -> str:
    """Earlier turns as the start of the run's prompt (the runtime adds the template's prefix before it).

    With a ChatML template the text closes the replayed turns and opens the new user turn, so the
    model reads exactly what :meth:`ChatMLTemplate.render_turns` gives in the system slot.
    """
    if template is None:
        return render_transcript(history) + "\n\n"
    turns, prefix = template.render_turns(history), template.prefix()
    head = turns[len(prefix) :] if turns.startswith(prefix) else "<|im_end|>\n" + turns
    return head + prefix


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
        slot = template.system_block(system, _tools_list(tools_json)) + template.render_turns(history)
        return ChatTemplate(slot, template.prefix(), template.postfix(thinking))
    slot = "\n\n".join(part for part in (system, render_transcript(history) if history else "") if part)
    if custom is not None:
        head, prefix, postfix = custom
        text = head.replace("{system}", slot) if "{system}" in head else head + slot
        return ChatTemplate(text, prefix, postfix)
    return FunctionTools(slot, tools_json or "[]", "tool_response")


def _tools_list(tools_json: str) -> list[str]:
    """The tools of a ChatML system block, one canonical JSON text each."""
    return [json.dumps(t, ensure_ascii=False, sort_keys=True) for t in json.loads(tools_json)] if tools_json else []


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
        results = [_json_or_text(plain(m.content)) for m in inputs]
        return json.dumps(results, ensure_ascii=False), "tool"
    parts = [
        f"<tool_response>\n{plain(m.content)}\n</tool_response>" if m.role == "tool" else content_with_name(m)
        for m in inputs
    ]
    return "\n\n".join(parts) + force, "user"


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
