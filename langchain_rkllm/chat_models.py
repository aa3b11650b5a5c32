"""``ChatRKLLM``: a LangChain chat model running on the Rockchip NPU through the RKLLM runtime."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from dataclasses import replace
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticToolsParser
from langchain_core.output_parsers.base import OutputParserLike
from langchain_core.output_parsers.pydantic import PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils import from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rkllm_core.chat.engine import (
    ChatDone,
    ChatEngine,
    ChatEvent,
    InvalidToolCall,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from rkllm_core.chat.messages import ChatMessage
from rkllm_core.chat.options import SAMPLING_FIELDS, ChatOptions, normalise_tool_choice
from rkllm_core.chat.templates import estimate_tokens
from rkllm_core.errors import InvalidParameterError

from ._client import ModelClient
from ._convert import UnsupportedContentError, to_core_messages

__all__ = ["ChatRKLLM", "UnsupportedContentError"]

_CALL_OPTIONS = frozenset(
    {
        "model",
        *SAMPLING_FIELDS,
        "max_tokens",
        "reasoning",
        "timeout",
        "tools",
        "tool_choice",
        "response_format",
    }
)
# Accepted and ignored: set by LangChain itself, or meaningless for a local runtime.
_IGNORED_CALL_OPTIONS = frozenset(
    {"ls_structured_output_format", "structured_output_format", "stream", "parallel_tool_calls", "strict"}
)

StructuredOutputMethod = Literal["function_calling", "json_schema", "json_mode"]


class ChatRKLLM(ModelClient[ChatEngine], BaseChatModel):
    r"""Chat model on the Rockchip NPU (RK3588 / RK3576), in-process, through the RKLLM runtime.

    Models are ``.rkllm`` files found by friendly name (``qwen3-0.6b``); they are
    loaded on the first call, not when the object is created, and swapped in and
    out by a ``rkllm_core`` model manager. Each loaded model knows which
    conversation its KV cache holds, so a request that continues it (from this
    or any other ``ChatRKLLM``) only prefills the new messages, and a request for
    another conversation is never answered in that one's context.
    Without ``librkllmrt.so`` everything runs on the bundled simulator.

    Setup:
        Install the package with its LangChain extra, put ``librkllmrt.so`` in
        ``/usr/lib`` (or set ``RKLLM_LIB_PATH``) and ``.rkllm`` files in
        ``~/.local/share/rkllm/models`` or ``./models`` (or set ``RKLLM_MODEL_DIR``).

        ```bash
        pip install -e ".[langchain]"
        rkllm models          # lists the models found, with their friendly names
        ```

    Key init args — completion params:
        model: str
            Friendly name, alias, file name or path of the model (default: ``$RKLLM_MODEL``).
        temperature: float | None
            Sampling temperature (``None``: the model's default).
        max_tokens: int | None
            Most tokens to generate.
        top_p, top_k, repeat_penalty, frequency_penalty, presence_penalty
            Further sampling settings.
        stop: list[str] | None
            Stop sequences; the reply ends before the first one.
        reasoning: bool | None
            Let a thinking model (Qwen3) reason first; the reasoning is reported
            in ``additional_kwargs["reasoning_content"]``, never in ``content``.

    Key init args — client params:
        manager: ModelManager | None
            The model manager to use (budget, swapping); default: the process-wide one.
        model_dir: str | None
            Look for models only in this directory (its own manager).
        library_path: str | None
            Path of ``librkllmrt.so`` (or of the simulator).
        timeout: float | None
            Seconds to wait for a busy model before ``BusyError``.

    See the fields below for every init arg.

    Instantiate:
        ```python
        from langchain_rkllm import ChatRKLLM

        model = ChatRKLLM(
            model="qwen3-0.6b",
            temperature=0.7,
            max_tokens=256,
            # manager=ModelManager(max_loaded=2), model_dir="...", library_path="...",
        )
        ```

    Invoke:
        ```python
        messages = [
            ("system", "You are a helpful translator. Translate the user sentence to French."),
            ("human", "I love programming."),
        ]
        model.invoke(messages)
        ```

        ```python
        AIMessage(
            content="J'adore la programmation.",
            response_metadata={"model_name": "qwen3-0.6b", "finish_reason": "stop", "model_provider": "rkllm",
                               "prefilled_tokens": 31, "kv_reused": False, ...},
            usage_metadata={"input_tokens": 31, "output_tokens": 7, "total_tokens": 38,
                            "input_token_details": {"cache_read": 0}},
        )
        ```

        On the simulator the reply is deterministic: ``Echo: I love programming. — ok.``

    Stream:
        ```python
        for chunk in model.stream(messages):
            print(chunk.text, end="", flush=True)
        ```

        Text arrives token by token; the last chunk has ``chunk_position="last"``,
        the finish reason and the token usage (only the last chunk carries usage).
        Leaving the loop early aborts the generation on the NPU.

    Async:
        ```python
        await model.ainvoke(messages)

        async for chunk in model.astream(messages):
            print(chunk.text, end="", flush=True)

        await model.abatch([messages, messages])
        ```

        The async methods never block the event loop; cancelling the task aborts
        the generation on the NPU. Concurrent requests for one model queue in
        arrival order (one generation per model at a time).

    Image input:
        ```python
        import base64

        from langchain_core.messages import HumanMessage

        vl = ChatRKLLM(model="qwen2.5-vl-3b")  # a vision model with its .rknn image encoder beside it
        png = base64.b64encode(open("photo.png", "rb").read()).decode()
        vl.invoke([HumanMessage([
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "base64": png, "mime_type": "image/png"},
        ])])
        ```

        User (human) messages take LangChain's image blocks (``"base64"`` or ``"url"``),
        OpenAI's ``{"type": "image_url", "image_url": {"url": "data:..."}}`` and the older
        ``source_type`` blocks; a ``url`` may be a ``data:`` URL or a local path. ``http(s)``
        URLs are fetched only with ``allow_remote_images=True``. An image in any other
        message, and audio, PDF or video blocks, raise ``UnsupportedContentError``.

    Tool calling:
        ```python
        from pydantic import BaseModel, Field


        class GetWeather(BaseModel):
            '''Get the current weather in a given location.'''

            location: str = Field(..., description="The city, e.g. Paris")


        model_with_tools = model.bind_tools([GetWeather])
        ai_msg = model_with_tools.invoke("What is the weather like in Paris? Use GetWeather.")
        ai_msg.tool_calls
        ```

        ```python
        [{"name": "GetWeather", "args": {"location": "Paris"}, "id": "call_5f1c...", "type": "tool_call"}]
        ```

        Tool calls are parsed from the model's Qwen-style ``<tool_call>`` blocks and
        streamed as ``tool_call_chunks``. ``tool_choice`` (``"auto"``, ``"any"`` /
        ``"required"``, a tool name, ``"none"``) is honoured by instructing the model,
        since the runtime cannot constrain decoding; small models follow it well.

    Structured output:
        ```python
        from typing import Optional

        from pydantic import BaseModel, Field


        class Joke(BaseModel):
            '''Joke to tell user.'''

            setup: str = Field(description="The setup of the joke")
            punchline: str = Field(description="The punchline to the joke")
            rating: Optional[int] = Field(description="How funny the joke is, from 1 to 10")


        structured_model = model.with_structured_output(Joke)  # method="function_calling"
        structured_model.invoke("Tell me a joke about cats")
        ```

        ```python
        Joke(setup="Why was the cat sitting on the computer?", punchline="To keep an eye on the mouse!", rating=None)
        ```

        ``method="json_schema"`` asks for a JSON instance of the schema in the reply
        text instead of a tool call; ``method="json_mode"`` asks for a JSON object.
        Pydantic classes, TypedDicts and JSON-schema dicts are accepted; pass
        ``include_raw=True`` to also get the raw message and any parsing error.

    Reasoning:
        ```python
        model = ChatRKLLM(model="qwen3-0.6b", reasoning=True)
        msg = model.invoke("How many r's are in 'strawberry'?")
        msg.additional_kwargs["reasoning_content"]   # the <think> block, without its tags
        msg.content                                  # the answer only
        ```

        ``reasoning=False`` (or ``None``, the default) switches thinking off.

    Usage metadata:
        ```python
        ai_msg = model.invoke(messages)
        ai_msg.usage_metadata
        ```

        ```python
        {"input_tokens": 31, "output_tokens": 7, "total_tokens": 38, "input_token_details": {"cache_read": 0}}
        ```

        ``input_tokens`` is the whole context the answer was conditioned on;
        ``input_token_details["cache_read"]`` the part served from the KV cache or
        a prompt cache, and ``response_metadata["prefilled_tokens"]`` the part the
        NPU actually processed. Send the returned ``AIMessage`` back unchanged in
        the next turn and only the new messages are prefilled.

    Response metadata:
        ``model_name`` (the resolved friendly name), ``finish_reason`` (``stop``,
        ``length`` or ``abort``), ``model_provider`` (``rkllm``),
        ``prefilled_tokens``, ``kv_reused``, ``sampling_policy`` (``run`` on runtime 1.3; on
        1.2 how the model manager served the sampling: ``instance``, ``reload`` or ``fixed``)
        and, when the runtime reports them, ``stats`` (prefill / generate times and tokens,
        peak memory).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str = Field(
        default_factory=from_env(
            "RKLLM_MODEL",
            error_message="ChatRKLLM needs a model: pass model='qwen3-0.6b' (see `rkllm models`) or set RKLLM_MODEL",
        )
    )
    """Friendly name (``qwen3-0.6b``), alias, file name or path of the model; default ``$RKLLM_MODEL``."""

    temperature: float | None = None
    """Sampling temperature, 0 to 100 (``None``: the model's default)."""

    max_tokens: int | None = None
    """Most tokens to generate (``None``: the model's default)."""

    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this, in (0, 1]."""

    top_k: int | None = None
    """Sample from the ``top_k`` most likely tokens."""

    repeat_penalty: float | None = None
    """Penalty for repeated tokens (1.0: none)."""

    frequency_penalty: float | None = None
    """Penalty growing with how often a token already appeared, -2 to 2."""

    presence_penalty: float | None = None
    """Penalty for tokens that already appeared at all, -2 to 2."""

    stop: list[str] | None = None
    """Stop sequences (at most 16): the reply ends before the first one found."""

    reasoning: bool | None = None
    """Thinking on (``True``) or off (``False``; ``None`` = off). The reasoning goes to
    ``additional_kwargs["reasoning_content"]``, never into ``content``."""

    streaming: bool = False
    """Stream tokens through ``invoke`` too (for callbacks); ``stream()`` always streams."""

    allow_remote_images: bool = False
    """Fetch images given by an ``http(s)`` URL (with size and time limits). Off by default: only
    image bytes, ``data:`` URLs and local paths are read."""

    engine_class = ChatEngine

    # -- validation ----------------------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check_settings(self) -> ChatRKLLM:
        # Pure-Python checks only (where models come from is checked by ModelClient).
        ChatOptions.from_settings(self._settings())
        return self

    # -- LangChain plumbing --------------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "rkllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **{name: getattr(self, name) for name in SAMPLING_FIELDS},
            "max_tokens": self.max_tokens,
            "stop": self.stop,
            "reasoning": self.reasoning,
            "model_dir": self.model_dir,
            "library_path": self.library_path,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="rkllm",
            ls_model_name=model if isinstance(model, str) and model else self.model,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def get_num_tokens(self, text: str) -> int:
        """A conservative token estimate (about one token per 3 UTF-8 bytes), no tokenizer needed."""
        return estimate_tokens(text)

    # -- the engine ----------------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        """This instance's settings, in the core's spelling."""
        settings: dict[str, Any] = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        settings.update(max_tokens=self.max_tokens, stop=self.stop, reasoning=self.reasoning, timeout=self.timeout)
        return settings

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> tuple[str, list[ChatMessage], ChatOptions]:
        """Translate one call into (model name, core messages, options)."""
        unknown = sorted(k for k in kwargs if k not in _CALL_OPTIONS and k not in _IGNORED_CALL_OPTIONS)
        if unknown:
            raise TypeError(
                f"ChatRKLLM got unsupported call argument(s) {', '.join(unknown)}; "
                f"supported: {', '.join(sorted(_CALL_OPTIONS))}"
            )
        model = kwargs.get("model") or self.model
        overrides = {k: v for k, v in kwargs.items() if k in _CALL_OPTIONS and k != "model"}
        overrides["stop"] = stop
        overrides["tools"] = [convert_to_openai_tool(t) for t in kwargs.get("tools") or ()]  # as-is from bind_tools
        options = ChatOptions.from_settings(self._settings(), overrides)
        if self.allow_remote_images:
            options = replace(options, allow_remote_images=True)
        return model, to_core_messages(messages), options

    # -- generation ----------------------------------------------------------------------------------------------
    def _chunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: Mapping[str, Any],
    ) -> Iterator[tuple[ChatGenerationChunk, ChatDone | None]]:
        model, core, options = self._request(messages, stop, kwargs)
        mapper = _ChunkMapper()
        with closing(self._engine().stream(model, core, options)) as events:  # closing early aborts the run
            for event in events:
                chunk = mapper.chunk(event)
                if chunk is None:
                    continue
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk, event if isinstance(event, ChatDone) else None

    async def _achunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
        kwargs: Mapping[str, Any],
    ) -> AsyncGenerator[tuple[ChatGenerationChunk, ChatDone | None], None]:
        model, core, options = self._request(messages, stop, kwargs)
        mapper = _ChunkMapper()
        async with aclosing(self._engine().astream(model, core, options)) as events:  # cancelling aborts the run
            async for event in events:
                chunk = mapper.chunk(event)
                if chunk is None:
                    continue
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk, event if isinstance(event, ChatDone) else None

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk, _ in self._chunks(messages, stop, run_manager, kwargs):
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async with aclosing(self._achunks(messages, stop, run_manager, kwargs)) as chunks:
            async for chunk, _ in chunks:
                yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks: list[ChatGenerationChunk] = []
        done: ChatDone | None = None
        for chunk, final in self._chunks(messages, stop, run_manager, kwargs):
            chunks.append(chunk)
            done = final or done
        return _result(chunks, done)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks: list[ChatGenerationChunk] = []
        done: ChatDone | None = None
        async with aclosing(self._achunks(messages, stop, run_manager, kwargs)) as stream:
            async for chunk, final in stream:
                chunks.append(chunk)
                done = final or done
        return _result(chunks, done)

    # -- tools and structured output -----------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (Pydantic classes, functions, ``BaseTool`` objects or OpenAI/Anthropic-style dicts).

        The tools are declared to the model in its chat template (Qwen's ``<tools>``
        format) and its ``<tool_call>`` blocks come back as ``tool_calls`` (and as
        ``tool_call_chunks`` while streaming).

        Args:
            tools: the tools; each is converted with ``convert_to_openai_tool``.
            tool_choice: ``None`` or ``"auto"`` (the model decides), ``"none"`` (no tool
                is offered), ``"any"`` or ``"required"`` (some tool must be called), a
                tool name, ``True`` (the single bound tool) or
                ``{"type": "function", "function": {"name": ...}}``. The runtime cannot
                constrain decoding, so a forced choice is achieved by instructing the
                model to answer with that call; small models follow it reliably.
            **kwargs: further call arguments bound with the tools (``strict`` and
                ``parallel_tool_calls`` are accepted and ignored).

        Raises:
            ValueError: an invalid ``tool_choice`` (e.g. a name that is not bound).
        """
        kwargs.pop("strict", None)
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = normalise_tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: StructuredOutputMethod = "function_calling",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Return a runnable whose output follows ``schema``.

        Args:
            schema: a Pydantic class (the output is an instance, validated), a
                ``TypedDict`` class or a JSON-schema / OpenAI-tool dict (the output is
                a dict). May be ``None`` only for ``method="json_mode"``.
            method:
                ``"function_calling"`` (default): the schema is bound as a tool the
                model is told to call; the call's arguments are the output.
                ``"json_schema"``: the prompt ends with "Respond with a JSON object
                matching this JSON schema: ..." and the reply text is parsed as JSON.
                ``"json_mode"``: the prompt asks for a JSON object (with the schema
                when one is given) and the reply is parsed as JSON.
            include_raw: return ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``
                instead of raising on a parsing error.
            **kwargs: ``strict`` is accepted and ignored (decoding cannot be constrained).

        Raises:
            ValueError: an unknown method, a missing schema, or unknown arguments.
        """
        kwargs.pop("strict", None)
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method}, "schema": schema}
        llm: Runnable[LanguageModelInput, BaseMessage]
        parser: OutputParserLike[Any]
        if method == "function_calling":
            if schema is None:
                raise ValueError("schema must be given for method='function_calling'")
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, ls_structured_output_format=ls_format)
            if is_pydantic:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            if schema is None and method == "json_schema":
                raise ValueError("schema must be given for method='json_schema'")
            json_schema = convert_to_json_schema(schema) if schema is not None else None
            if method == "json_schema":
                response_format: dict[str, Any] = {
                    "type": "json_schema",
                    "json_schema": {"name": (json_schema or {}).get("title", "output"), "schema": json_schema},
                }
            else:
                response_format = {"type": "json_object", "schema": json_schema}
            bind_format = ls_format if schema is not None else None
            llm = self.bind(response_format=response_format, ls_structured_output_format=bind_format)
            parser = (
                PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                if is_pydantic
                else JsonOutputParser()
            )
        else:
            raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
        if include_raw:
            parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
            parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
            with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
            return RunnableMap(raw=llm) | with_fallback
        return llm | parser


class _ChunkMapper:
    """Turns engine events into ``ChatGenerationChunk`` objects (one instance per request)."""

    def __init__(self) -> None:
        self._streamed_calls: set[int] = set()

    def chunk(self, event: ChatEvent) -> ChatGenerationChunk | None:
        if isinstance(event, TextDelta):
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        if isinstance(event, ReasoningDelta):
            return ChatGenerationChunk(
                message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": event.text})
            )
        if isinstance(event, ToolCallDelta):
            self._streamed_calls.add(event.index)
            part = tool_call_chunk(name=event.name, args=event.arguments_delta, id=event.id, index=event.index)
            return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[part]))
        if isinstance(event, InvalidToolCall):
            if event.index in self._streamed_calls:
                return None  # its pieces were streamed already; aggregation judges the arguments
            bad = invalid_tool_call(name=event.name, args=event.raw, id=event.id, error=event.error)
            return ChatGenerationChunk(message=AIMessageChunk(content="", invalid_tool_calls=[bad]))
        if isinstance(event, ChatDone):
            return ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    usage_metadata=_usage(event),
                    response_metadata=_response_metadata(event),
                    chunk_position="last",
                ),
                generation_info={"finish_reason": event.finish_reason},
            )
        return None  # complete ToolCall events: their deltas were streamed already


def _usage(done: ChatDone) -> UsageMetadata:
    u = done.usage
    return UsageMetadata(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        total_tokens=u.total_tokens,
        input_token_details=InputTokenDetails(cache_read=u.cached_tokens),
    )


def _response_metadata(done: ChatDone) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "model_name": done.model,
        "finish_reason": done.finish_reason,
        "model_provider": "rkllm",
        "prefilled_tokens": done.usage.prefilled_tokens,
        "kv_reused": done.kv_reused,
        "sampling_policy": done.sampling_policy,
    }
    if done.stats is not None:
        meta["stats"] = done.stats_dict()
    return meta


def _result(chunks: list[ChatGenerationChunk], done: ChatDone | None) -> ChatResult:
    """The final message: the chunks aggregated, with the engine's parsed tool calls."""
    if not chunks or done is None:
        raise InvalidParameterError("the runtime produced no reply")  # the engine always ends with ChatDone
    merged = chunks[0] + chunks[1:] if len(chunks) > 1 else chunks[0]
    agg = merged.message
    additional = dict(agg.additional_kwargs)
    if done.reasoning:
        additional["reasoning_content"] = done.reasoning
    message = AIMessage(
        content=done.message.content,
        additional_kwargs=additional,
        response_metadata=dict(agg.response_metadata),
        usage_metadata=_usage(done),
        tool_calls=[tool_call(name=c.name, args=dict(c.arguments), id=c.id) for c in done.message.tool_calls],
        invalid_tool_calls=[
            invalid_tool_call(name=c.name, args=c.raw, id=c.id, error=c.error) for c in done.invalid_tool_calls
        ],
        id=agg.id,
    )
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=merged.generation_info)])
