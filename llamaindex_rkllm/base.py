"""``RKLLM``: a LlamaIndex LLM that runs models on the Rockchip NPU, in-process.

It is a thin adapter over :class:`rkllm_core.chat.engine.ChatEngine`:

* LlamaIndex messages become ``rkllm_core`` messages (tool calls and tool
  results included), so a conversation sent back turn after turn extends the
  one already in the NPU's KV cache and only the new messages are prefilled;
* the engine's events become LlamaIndex responses: answer text, reasoning (a
  :class:`~llama_index.core.base.llms.types.ThinkingBlock`, never mixed into the
  answer), tool calls (:class:`~llama_index.core.base.llms.types.ToolCallBlock`
  and OpenAI-style ``additional_kwargs["tool_calls"]``) and token usage in
  ``raw["usage"]``, where LlamaIndex's ``TokenCountingHandler`` reads it.

What a model's KV cache holds is known by the model's handle, so every instance
(and every other user of the same manager) continues a conversation the cache
holds, and none is ever answered in another's context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import aclosing, closing
from dataclasses import asdict, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.generic_utils import (
    achat_to_completion_decorator,
    astream_chat_to_completion_decorator,
    chat_to_completion_decorator,
    stream_chat_to_completion_decorator,
)
from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator, model_validator
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from rkllm_core.chat import messages as core
from rkllm_core.chat.engine import (
    ChatDone,
    ChatEngine,
    ChatEvent,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    acollect,
    collect,
)
from rkllm_core.chat.options import SAMPLING_FIELDS, SETTINGS, ChatOptions
from rkllm_core.errors import InvalidParameterError, RKLLMError

from ._common import ModelClient, check_model

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["FALLBACK_CONTEXT_WINDOW", "RKLLM"]

logger = logging.getLogger(__name__)

FALLBACK_CONTEXT_WINDOW = 4096
"""Context window reported when the model cannot be found in the registry (and no override is set)."""

_Request = tuple[list[core.ChatMessage], ChatOptions]
_IGNORED_KWARGS = frozenset({"formatted", "allow_parallel_tool_calls", "tool_required", "verbose"})


class RKLLM(ModelClient[ChatEngine], FunctionCallingLLM):
    """A model on the Rockchip NPU (RKLLM runtime) as a LlamaIndex LLM.

    Constructing it loads nothing: the runtime library and the model are loaded
    by the model manager on the first request (and swapped out for other models
    when the manager's budget requires it).

    Examples:
        ```python
        from llama_index.core import Settings
        from llamaindex_rkllm import RKLLM

        Settings.llm = RKLLM(model="qwen3-0.6b", temperature=0.7, max_tokens=512)
        print(Settings.llm.complete("Why is the sky blue?"))
        ```

    The model may also be given as the first argument, as ``model_name=`` (Hugging Face
    LLM's spelling) or by ``RKLLM_MODEL`` (then ``RKLLM()`` needs no argument). Other
    integrations' spellings are understood: ``max_tokens`` (OpenAI, Ollama) is
    ``max_new_tokens``, ``request_timeout`` (Ollama) is ``timeout``; an argument this class
    does not know is ignored with a ``UserWarning`` naming it.

    Per-call keyword arguments override the settings of the same name for one
    request: ``temperature``, ``top_p``, ``top_k``, ``repeat_penalty``,
    ``frequency_penalty``, ``presence_penalty``, ``max_new_tokens`` (or
    ``max_tokens``), ``stop``, ``thinking`` (or ``enable_thinking``),
    ``timeout``, plus ``tools`` and ``tool_choice``.

    Args:
        model: the model (see the ``model`` field); default ``$RKLLM_MODEL``.
        manager: a :class:`rkllm_core.models.manager.ModelManager` to take models from
            (budget, swapping); every ``RKLLM`` on one manager shares its loaded models.
            Default: one manager per ``model_dir``/``library_path`` pair, or the
            process-wide manager when neither is set.
        **kwargs: the other fields, and ``model_name``, ``max_tokens``, ``request_timeout``.

    Raises:
        ValueError: no model is given and ``RKLLM_MODEL`` is not set; ``model`` and
            ``model_name`` (or ``max_tokens`` and ``max_new_tokens``...) differ; a setting is
            invalid (pydantic's ``ValidationError`` is a ``ValueError`` too).
        TypeError: ``manager`` is not a ``ModelManager``.
    """

    model: str = Field(
        description=(
            "The model to run: a friendly name such as 'qwen3-0.6b', an alias from rkllm-models.toml, "
            "a .rkllm file name (with or without the suffix) or a path to a .rkllm file."
        )
    )
    temperature: float | None = Field(
        default=None,
        description="Sampling temperature (0-100); None keeps the model's default (registry file or runtime).",
    )
    max_new_tokens: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Most tokens generated per answer (max_tokens, OpenAI's and Ollama's name, sets it too); None keeps the "
            "model's default. Also LlamaIndex's num_output: the room left for the answer when prompts are packed "
            "(256 when unset)."
        ),
    )
    top_p: float | None = Field(
        default=None, description="Nucleus sampling threshold in (0, 1]; None keeps the model's default."
    )
    top_k: int | None = Field(
        default=None, description="Sample from the k most likely tokens (0 disables); None keeps the model's default."
    )
    repeat_penalty: float | None = Field(
        default=None, description="Penalty for repeated tokens (1.0 is none); None keeps the model's default."
    )
    frequency_penalty: float | None = Field(
        default=None, description="Frequency penalty in [-2, 2]; None keeps the model's default."
    )
    presence_penalty: float | None = Field(
        default=None, description="Presence penalty in [-2, 2]; None keeps the model's default."
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Stop sequences: the answer ends before the first one found (generation is aborted there).",
    )
    thinking: bool = Field(
        default=False,
        description=(
            "Let a thinking model (Qwen3, ...) reason before answering. The reasoning is returned separately "
            "(a ThinkingBlock in chat messages, additional_kwargs['reasoning_content'] in completions), never "
            "in the answer text."
        ),
    )
    additional_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "More request settings, under any name a per-call keyword argument takes (e.g. mirostat, mirostat_tau, "
            "mirostat_eta, response_format); per-call arguments override them. An unknown name is refused."
        ),
    )
    allow_remote_images: bool = Field(
        default=False,
        description=(
            "Fetch ImageBlock images given by an http(s) URL (with size and time limits). Off by default: "
            "image bytes, paths and data: URLs are read."
        ),
    )
    context_window: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Context window LlamaIndex packs prompts for. None: the model's context (from its file name or "
            "rkllm-models.toml). A value above the model's context is capped to it."
        ),
    )

    _warned: set[str] = PrivateAttr(default_factory=set)

    engine_class = ChatEngine
    init_aliases = {"request_timeout": "timeout", "max_tokens": "max_new_tokens"}

    # -- validation -----------------------------------------------------------------------------
    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return check_model(value)

    @field_validator("additional_kwargs", mode="before")
    @classmethod
    def _check_additional_kwargs(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            unknown = sorted(str(k) for k in value if k not in SETTINGS)
            if unknown:
                known = ", ".join(sorted(SETTINGS))
                raise ValueError(f"additional_kwargs: RKLLM does not know {', '.join(unknown)}; it takes: {known}")
        return value

    @model_validator(mode="after")
    def _check_settings(self) -> RKLLM:
        # The same checks the runtime layer makes, so a bad value fails here and not at the first request.
        ChatOptions.from_settings(self._settings(), self._overrides({}))
        return self

    @classmethod
    def class_name(cls) -> str:
        """Name used by LlamaIndex for serialisation and callbacks."""
        return "RKLLM"

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def metadata(self) -> LLMMetadata:
        """What LlamaIndex needs to know to pack prompts: context window, output room, chat and tools."""
        return LLMMetadata(
            context_window=self._context_window(),
            num_output=self.max_new_tokens or DEFAULT_NUM_OUTPUTS,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model,
        )

    def _context_window(self) -> int:
        """The context the model is initialised with (registry), capped by the override.

        Reading the registry only lists file names; the library is not loaded.
        """
        try:
            info = self.manager.resolve(self.model)
        except (RKLLMError, OSError) as exc:
            fallback = self.context_window or FALLBACK_CONTEXT_WINDOW
            self._warn_once(
                "registry",
                "cannot read the context size of %r from the model registry (%s); assuming %d tokens",
                self.model,
                exc,
                fallback,
            )
            return fallback
        model_ctx = info.defaults.max_context_len or info.context_size
        if self.context_window is None:
            return model_ctx
        if self.context_window > model_ctx:
            self._warn_once(
                "context",
                "context_window=%d is larger than the %d-token context of %s; using %d",
                self.context_window,
                model_ctx,
                info.name,
                model_ctx,
            )
            return model_ctx
        return self.context_window

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # -- options ----------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        """This instance's settings, in the core's spelling."""
        settings: dict[str, Any] = {key: getattr(self, key) for key in SAMPLING_FIELDS}
        settings.update(max_new_tokens=self.max_new_tokens, stop=self.stop, thinking=self.thinking)
        settings["timeout"] = self.timeout
        return settings

    def _overrides(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``additional_kwargs`` with this call's keyword arguments on top (those the core knows)."""
        overrides = {**self.additional_kwargs, **{k: v for k, v in kwargs.items() if k in SETTINGS}}
        if overrides.get("tools"):
            overrides["tools"] = _tool_dicts(overrides["tools"])
        return overrides

    def _options(self, kwargs: Mapping[str, Any]) -> ChatOptions:
        """The request options: the settings, then ``additional_kwargs``, then this call's keyword arguments."""
        unknown = sorted(k for k in kwargs if k not in SETTINGS and k not in _IGNORED_KWARGS)
        if unknown:
            logger.debug("RKLLM ignores these keyword arguments: %s", ", ".join(unknown))
        options = ChatOptions.from_settings(self._settings(), self._overrides(kwargs))
        return replace(options, allow_remote_images=True) if self.allow_remote_images else options

    # -- requests -------------------------------------------------------------------------------
    def _request(self, system: str | None, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]) -> _Request:
        """Translate and validate a request up front, so bad input fails at the call, not mid-stream.

        ``system``, when set, is sent as a system message before ``messages``.
        """
        if system:
            messages = [ChatMessage(role=MessageRole.SYSTEM, content=system), *messages]
        return core.validate_messages(to_core_messages(messages)), self._options(kwargs)

    def _completion_system(self, formatted: bool) -> str | None:
        """The system prompt a completion is sent with: ``system_prompt``, unless the prompt is ``formatted``."""
        return None if formatted else self.system_prompt

    # -- chat: written once; the completion methods derive from these four --------------------
    # ``system`` is positional-only, so no keyword argument of a call can collide with it.
    def _chat(self, system: str | None, messages: Sequence[ChatMessage], /, **kwargs: Any) -> ChatResponse:
        request = self._request(system, messages, kwargs)
        with closing(self.engine.stream(self.model, *request)) as events:
            return _chat_response(collect(events))

    def _stream_chat(self, system: str | None, messages: Sequence[ChatMessage], /, **kwargs: Any) -> ChatResponseGen:
        request = self._request(system, messages, kwargs)  # validated now, not at the first next()

        def gen() -> ChatResponseGen:
            acc = _Accumulator()
            with closing(self.engine.stream(self.model, *request)) as events:
                for event in events:
                    if (response := acc.feed(event)) is not None:
                        yield response

        return gen()

    async def _achat(self, system: str | None, messages: Sequence[ChatMessage], /, **kwargs: Any) -> ChatResponse:
        request = self._request(system, messages, kwargs)
        return _chat_response(await acollect(self.engine.astream(self.model, *request)))

    async def _astream_chat(
        self, system: str | None, messages: Sequence[ChatMessage], /, **kwargs: Any
    ) -> ChatResponseAsyncGen:
        request = self._request(system, messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            acc = _Accumulator()
            async with aclosing(self.engine.astream(self.model, *request)) as events:
                async for event in events:
                    if (response := acc.feed(event)) is not None:
                        yield response

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation (the last message must be from the user or a tool)."""
        return self._chat(None, messages, **kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream the answer: each response carries ``delta`` and the message so far.

        The last response has an empty ``delta`` and the complete message, ``raw``
        (usage, finish reason, stats) and the tool calls. Closing the generator early
        aborts the generation on the NPU.
        """
        return self._stream_chat(None, messages, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat`: never blocks the event loop; cancelling the task aborts the generation."""
        return await self._achat(None, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """Async :meth:`stream_chat`; cancelling the consumer or closing the generator aborts the generation."""
        return await self._astream_chat(None, messages, **kwargs)

    # -- completion: LlamaIndex's converters over the chat methods --------------------------------
    # The prompt becomes one user message, after ``system_prompt`` unless ``formatted``; the chat
    # response becomes a completion: the answer as ``text``, and in ``additional_kwargs`` the token
    # counts, ``reasoning_content`` (thinking models) and OpenAI-style ``tool_calls``. The private
    # chat methods are converted, not the public ones, so a completion reports completion events only.
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Answer one prompt (sent as a user message, after ``system_prompt`` when set and not ``formatted``)."""
        chat = partial(self._chat, self._completion_system(formatted))
        return chat_to_completion_decorator(chat)(prompt, **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the answer to one prompt (``delta`` and ``text`` so far; see :meth:`stream_chat`)."""
        stream_chat = partial(self._stream_chat, self._completion_system(formatted))
        return stream_chat_to_completion_decorator(stream_chat)(prompt, **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Async :meth:`complete`."""
        achat = partial(self._achat, self._completion_system(formatted))
        return await achat_to_completion_decorator(achat)(prompt, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        """Async :meth:`stream_complete`."""
        astream_chat = partial(self._astream_chat, self._completion_system(formatted))
        return await astream_chat_to_completion_decorator(astream_chat)(prompt, **kwargs)

    # -- tools ------------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Turn LlamaIndex tools into the request: OpenAI-style definitions and a tool choice.

        ``tool_required`` becomes ``tool_choice="required"``: the model is told to answer
        with a call (it cannot be forced token by token; see docs/llamaindex.md).
        """
        del verbose, allow_parallel_tool_calls
        tool_specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
        elif user_msg is not None:
            messages.append(user_msg)
        if tool_choice is None and tool_required:
            tool_choice = "required"
        return {"messages": messages, "tools": tool_specs, "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel calls are allowed."""
        if not allow_parallel_tool_calls:
            _keep_first_tool_call(response.message)
        return response

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The tool calls of a response as ``ToolSelection`` objects.

        Raises:
            ValueError: there is no tool call and ``error_on_no_tool_call`` is true.
        """
        calls = tool_calls_of(response.message)
        if not calls and error_on_no_tool_call:
            raise ValueError(
                f"Expected at least one tool call, got none; the model answered: {response.message.content!r}"
            )
        return [ToolSelection(tool_id=c.id or c.name, tool_name=c.name, tool_kwargs=dict(c.arguments)) for c in calls]


# ------------------------------------------------------------------------------------- messages


_ROLES: dict[MessageRole, core.MessageRole] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def to_core_messages(messages: Sequence[ChatMessage]) -> list[core.ChatMessage]:
    """Translate LlamaIndex messages into ``rkllm_core`` messages.

    Assistant tool calls (``ToolCallBlock`` blocks, else ``additional_kwargs["tool_calls"]``)
    become :class:`~rkllm_core.chat.messages.ToolCallRequest` objects and tool results keep their
    ``tool_call_id``, so a conversation sent back unchanged matches the one in the KV cache.
    Thinking blocks are dropped (earlier reasoning is not part of the prompt). ``ImageBlock``
    blocks of user messages become :class:`~rkllm_core.chat.messages.ImagePart` values: bytes
    and paths are read here, a URL is passed on (http(s) is fetched only with
    ``allow_remote_images``).

    Raises:
        ValueError: an image outside a user message, or audio, video or documents.
    """
    out = []
    for m in messages:
        role = _ROLES.get(MessageRole(m.role))
        if role is None:  # pragma: no cover - every MessageRole is mapped
            raise InvalidParameterError(f"unsupported message role {m.role!r}")
        text = _text_of(m)
        extra = m.additional_kwargs or {}
        name = extra.get("name") if isinstance(extra.get("name"), str) else None
        if role == "assistant":
            out.append(core.ChatMessage("assistant", text, name=name, tool_calls=tuple(tool_calls_of(m))))
        elif role == "tool":
            call_id = extra.get("tool_call_id")
            out.append(core.ChatMessage("tool", text, name=name, tool_call_id=str(call_id) if call_id else None))
        elif role == "user":
            out.append(core.ChatMessage("user", text, name=name, images=_images_of(m)))
        else:
            out.append(core.ChatMessage(role, text))
    return out


def _images_of(message: ChatMessage) -> tuple[core.ImagePart, ...]:
    """The ``ImageBlock`` images of a user message, in order: bytes (a path is read), or the URL."""
    parts = []
    for block in message.blocks:
        if not isinstance(block, ImageBlock):
            continue
        if block.image is None and block.path is None and block.url is not None:
            parts.append(core.ImagePart(url=str(block.url)))
            continue
        try:
            data = block.resolve_image().read()
        except (OSError, ValueError) as exc:
            raise InvalidParameterError(f"an ImageBlock of a user message cannot be read: {exc}") from exc
        parts.append(core.ImagePart(data=data))
    return tuple(parts)


def _text_of(message: ChatMessage) -> str:
    parts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, ThinkingBlock | ToolCallBlock | CachePoint):
            continue
        elif isinstance(block, ImageBlock) and message.role == MessageRole.USER:
            continue
        elif isinstance(block, ImageBlock):
            raise InvalidParameterError(
                f"RKLLM takes images in user messages only; a {message.role.value} message has an ImageBlock"
            )
        else:
            raise InvalidParameterError(
                f"RKLLM takes text and images only; a {message.role.value} message has a {type(block).__name__}"
            )
    return "\n".join(parts)


def tool_calls_of(message: ChatMessage) -> list[core.ToolCallRequest]:
    """The tool calls of an assistant message: its ``ToolCallBlock`` blocks, else ``additional_kwargs``."""
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        return [
            core.ToolCallRequest(b.tool_call_id or b.tool_name, b.tool_name, _arguments(b.tool_kwargs)) for b in blocks
        ]
    calls = []
    for item in (message.additional_kwargs or {}).get("tool_calls") or ():
        call = _parse_tool_call(item)
        if call is not None:
            calls.append(call)
    return calls


def _parse_tool_call(item: Any) -> core.ToolCallRequest | None:
    """Read a tool call in any of the shapes LlamaIndex code uses (OpenAI dict or object, ToolSelection)."""
    if isinstance(item, ToolSelection):
        return core.ToolCallRequest(item.tool_id, item.tool_name, _arguments(item.tool_kwargs))
    if isinstance(item, ToolCallBlock):
        return core.ToolCallRequest(item.tool_call_id or item.tool_name, item.tool_name, _arguments(item.tool_kwargs))
    if not isinstance(item, Mapping):
        if hasattr(item, "model_dump"):
            item = item.model_dump()
        else:
            return None
    fn = item.get("function") if isinstance(item.get("function"), Mapping) else item
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = fn.get("arguments", fn.get("args", fn.get("tool_kwargs", {})))
    return core.ToolCallRequest(str(item.get("id") or name), name, _arguments(args))


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return {}
    return dict(value) if isinstance(value, Mapping) else {}


def _openai_tool_call(call: core.ToolCallRequest) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(dict(call.arguments), ensure_ascii=False)},
    }


def _tool_dicts(tools: Sequence[Any]) -> list[Mapping[str, Any]]:
    """Tools as OpenAI-style dicts (LlamaIndex tools are converted)."""
    out: list[Mapping[str, Any]] = []
    for tool in tools:
        if isinstance(tool, Mapping):
            out.append(tool)
        elif hasattr(tool, "metadata") and hasattr(tool.metadata, "to_openai_tool"):
            out.append(tool.metadata.to_openai_tool(skip_length_check=True))
        else:
            raise InvalidParameterError(f"cannot use {type(tool).__name__} as a tool definition")
    return out


def _keep_first_tool_call(message: ChatMessage) -> None:
    seen = False
    blocks = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            if seen:
                continue
            seen = True
        blocks.append(block)
    message.blocks = blocks
    calls = message.additional_kwargs.get("tool_calls")
    if isinstance(calls, list) and len(calls) > 1:
        message.additional_kwargs["tool_calls"] = calls[:1]


# ------------------------------------------------------------------------------------- responses


def _raw(done: ChatDone) -> dict[str, Any]:
    u = done.usage
    return {
        "model": done.model,
        "finish_reason": done.finish_reason,
        "usage": {
            "prompt_tokens": u.input_tokens,
            "completion_tokens": u.output_tokens,
            "total_tokens": u.total_tokens,
            "prefilled_tokens": u.prefilled_tokens,
            "cached_tokens": u.cached_tokens,
        },
        "kv_reused": done.kv_reused,
        "sampling_policy": done.sampling_policy,
        "stats": done.stats_dict(),
        "invalid_tool_calls": [asdict(c) for c in done.invalid_tool_calls],
    }


def _usage_kwargs(done: ChatDone) -> dict[str, int]:
    u = done.usage
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens}


def _assistant_message(text: str, reasoning: str, calls: Sequence[core.ToolCallRequest]) -> ChatMessage:
    blocks: list[Any] = []
    if reasoning:
        blocks.append(ThinkingBlock(content=reasoning))
    blocks.append(TextBlock(text=text))
    blocks.extend(ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments)) for c in calls)
    extra: dict[str, Any] = {"tool_calls": [_openai_tool_call(c) for c in calls]} if calls else {}
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def _chat_response(done: ChatDone, delta: str | None = None) -> ChatResponse:
    """The final response: the whole message, ``raw`` and, in ``additional_kwargs``, usage and reasoning."""
    message = _assistant_message(done.message.content, done.reasoning, done.message.tool_calls)
    extra: dict[str, Any] = _usage_kwargs(done)
    if done.reasoning:
        extra["reasoning_content"] = done.reasoning
    return ChatResponse(message=message, raw=_raw(done), delta=delta, additional_kwargs=extra)


class _Accumulator:
    """Turns engine events into streamed responses carrying the message so far."""

    def __init__(self) -> None:
        self.text = ""
        self.reasoning = ""
        self.calls: list[core.ToolCallRequest] = []

    def feed(self, event: ChatEvent) -> ChatResponse | None:
        """The response for one event (``None`` for an event reported only in the final response)."""
        delta = thinking_delta = ""
        if isinstance(event, ChatDone):
            return _chat_response(event, delta="")
        if isinstance(event, TextDelta):
            self.text += event.text
            delta = event.text
        elif isinstance(event, ReasoningDelta):
            self.reasoning += event.text
            thinking_delta = event.text
        elif isinstance(event, ToolCall):
            self.calls.append(core.ToolCallRequest(event.id, event.name, event.arguments))
        else:
            return None  # ToolCallDelta / InvalidToolCall: reported in the final response
        message = _assistant_message(self.text, self.reasoning, self.calls)
        extra = {"thinking_delta": thinking_delta} if thinking_delta else {}
        return ChatResponse(message=message, delta=delta, additional_kwargs=extra)
