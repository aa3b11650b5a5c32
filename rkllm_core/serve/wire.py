"""OpenAI's wire format, both ways: request bodies to core types, core results to response bodies.

Pure functions over dicts, with no HTTP in them, so they are tested on their own. A bad field raises
:class:`WireError` naming it (``messages[2].content``), which the router in :mod:`.openai` answers
with OpenAI's error object, status 400 and that ``param``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..chat.engine import ChatDone, InvalidToolCall, ReasoningDelta, TextDelta, ToolCall, ToolCallDelta
from ..chat.messages import ChatMessage, ImagePart, ToolCallRequest
from ..chat.options import ChatOptions
from ..errors import ModelNotFoundError
from ..models.registry import ModelInfo
from ..params import SAMPLING_FIELDS
from .wire_errors import WireError
from .wire_images import ImagePolicy, image_from_url

__all__ = [
    "ChatRequest",
    "ChatStream",
    "TextStream",
    "WireError",
    "chat_chunk",
    "chat_completion",
    "chat_request",
    "completion_request",
    "cut_chunk",
    "embedding_request",
    "embeddings_response",
    "model_object",
    "models_list",
    "rerank_request",
    "rerank_response",
    "role_chunk",
    "text_completion",
    "usage_chunk",
    "usage_of",
]

# Request fields that change nothing here, accepted so that clients which always send them work.
_IGNORED = frozenset(
    {"user", "n", "logprobs", "top_logprobs", "logit_bias", "seed", "store", "metadata", "service_tier"}
)
_SAMPLING = SAMPLING_FIELDS  # OpenAI's names plus the runtime's own (top_k, repeat_penalty, mirostat*)
_KNOWN = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning_effort",
        *_SAMPLING,
    }
)


# /v1/completions: its own fields, and those it takes only at the value that changes nothing.
_COMPLETION_KNOWN = frozenset({"model", "prompt", "stream", "stream_options", "max_tokens", "stop", *_SAMPLING})
_COMPLETION_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "suffix": (None, ""),
    "logprobs": (None, 0),
    "best_of": (None, 1),
    "n": (None, 1),
}


class ModelPathError(ModelNotFoundError):
    """A ``model`` that is a path: refused like an unknown model (the server never opens request paths)."""


def _require(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in body:
        raise WireError(f"'{where}{key}' is required", f"{where}{key}")
    value = body[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise WireError(f"'{where}{key}' has the wrong type ({type(value).__name__})", f"{where}{key}")
    return value


def _model_name(body: Mapping[str, Any]) -> str:
    """The ``model`` field: a name the registry knows, never a path (requests must not pick files)."""
    name: str = _require(body, "model", str)
    if "/" in name or "\\" in name or name.startswith(("~", ".")) or "\0" in name:
        raise ModelPathError(f"'model' must be a model name from /v1/models, not a path: {name!r}")
    return name


def _content_of(content: Any, where: str, role: str, images: ImagePolicy) -> tuple[str, tuple[ImagePart, ...]]:
    """A message's content: a string, or a list of text parts and (in user messages) ``image_url`` parts."""
    if content is None:
        return "", ()
    if isinstance(content, str):
        return content, ()
    if not isinstance(content, list):
        raise WireError(f"'{where}' must be a string or a list of content parts", where)
    parts: list[str] = []
    found: list[ImagePart] = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url" and role == "user":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            found.append(image_from_url(url, f"{at}.image_url.url", images))
        elif kind == "image_url":
            raise WireError(f"'{at}': images go in user messages only, not in a {role} message", at)
        else:
            raise WireError(f"'{at}' must be a text or image_url part; this server takes no {kind!r} parts", at)
    return "".join(parts), tuple(found)


def _tool_calls_of(value: Any, where: str) -> tuple[ToolCallRequest, ...]:
    if not isinstance(value, list):
        raise WireError(f"'{where}' must be a list", where)
    calls = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise WireError(f"'{at}' must be an object with a 'function'", at)
        fn = call["function"]
        name = _require(fn, "name", str, f"{at}.function.")
        raw = fn.get("arguments", "{}")
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise WireError(f"'{at}.function.arguments' is not JSON: {exc}", f"{at}.function.arguments") from exc
        if not isinstance(arguments, dict):
            raise WireError(f"'{at}.function.arguments' must encode a JSON object", f"{at}.function.arguments")
        call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
        calls.append(ToolCallRequest(str(call_id), name, arguments))
    return tuple(calls)


def _messages(value: Any, images: ImagePolicy) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise WireError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise WireError(f"'{at}' must be an object", at)
        role = _require(m, "role", str, f"{at}.")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise WireError(
                f"'{at}.role' must be system, developer, user, assistant or tool, not {role!r}", f"{at}.role"
            )
        content, parts = _content_of(m.get("content"), f"{at}.content", role, images)
        calls = (
            _tool_calls_of(m["tool_calls"], f"{at}.tool_calls") if role == "assistant" and m.get("tool_calls") else ()
        )
        tool_call_id = m.get("tool_call_id") if role == "tool" else None
        if role == "tool" and not isinstance(tool_call_id, str):
            raise WireError(f"'{at}.tool_call_id' is required for a tool message", f"{at}.tool_call_id")
        name = m.get("name") if isinstance(m.get("name"), str) else None
        out.append(
            ChatMessage(role, content, name=name, tool_calls=calls, tool_call_id=tool_call_id, images=parts)  # type: ignore[arg-type]
        )
    return out


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A ``/v1/chat/completions`` request, read."""

    model: str
    messages: list[ChatMessage]
    options: ChatOptions
    stream: bool
    include_usage: bool
    parallel_tool_calls: bool


def chat_request(body: Any, *, max_tokens_limit: int | None = None, images: ImagePolicy | None = None) -> ChatRequest:
    """Read a ``/v1/chat/completions`` body.

    User messages may carry ``{"type": "image_url", "image_url": {"url": ...}}`` parts: a base64
    ``data:`` URL (decoded here, at most ``images.max_bytes``), or an ``http(s)`` URL when
    ``images.allow_remote`` (else a 400 naming ``--allow-remote-images``); never a path.

    Raises:
        WireError: a missing or malformed field (named), or one the runtime cannot honour.
        InvalidParameterError: a value out of range (from :class:`ChatOptions`).
    """
    if not isinstance(body, dict):
        raise WireError("the body must be a JSON object")
    model = _model_name(body)
    images = images or ImagePolicy()
    messages = _messages(body.get("messages"), images)
    for key in body:
        if key not in _KNOWN and key not in _IGNORED:
            raise WireError(f"unknown field '{key}'", key)
    if body.get("n", 1) not in (1, None):
        raise WireError("'n' must be 1: the runtime generates one answer per request", "n")
    stream = bool(body.get("stream", False))
    include_usage = _stream_options(body)
    keys = ("max_tokens", "max_completion_tokens", "stop", "tools", "tool_choice", "response_format")
    settings = _settings(body, keys, max_tokens_limit)
    if body.get("reasoning_effort") not in (None, "none", "minimal"):
        settings["reasoning"] = True
    options = ChatOptions.from_settings(settings)
    return ChatRequest(
        model,
        messages,
        replace(options, allow_remote_images=True) if images.allow_remote else options,
        stream,
        include_usage,
        body.get("parallel_tool_calls") is not False,
    )


def _settings(body: Mapping[str, Any], keys: Sequence[str], max_tokens_limit: int | None) -> dict[str, Any]:
    """The sampling fields and ``keys`` that ``body`` sets, for :meth:`ChatOptions.from_settings`."""
    settings: dict[str, Any] = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    for key in keys:
        if body.get(key) is not None:
            settings[key] = body[key]
    limit = settings.get("max_completion_tokens", settings.get("max_tokens"))
    if limit is not None and max_tokens_limit is not None and isinstance(limit, int) and limit > max_tokens_limit:
        raise WireError(f"max_tokens={limit} is above this server's limit of {max_tokens_limit}", "max_tokens")
    return settings


def _stream_options(body: Mapping[str, Any]) -> bool:
    """Whether ``stream_options.include_usage`` is set."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise WireError("'stream_options' must be an object", "stream_options")
    return bool(options.get("include_usage"))


def completion_request(body: Any, *, max_tokens_limit: int | None = None) -> ChatRequest:
    """Read a ``/v1/completions`` body: the prompt becomes one user message of a chat.

    The model answers the prompt through its chat template (RKLLM models are chat models), so this
    is "the answer to the prompt", not a raw continuation of it. ``prompt`` is a string, or a list
    holding one string; ``echo``, ``suffix``, ``logprobs``, ``best_of`` and ``n`` are taken only at
    the values that change nothing.

    Raises:
        WireError: a missing or malformed field (named), or one the runtime cannot honour.
        InvalidParameterError: a value out of range (from :class:`ChatOptions`).
    """
    if not isinstance(body, dict):
        raise WireError("the body must be a JSON object")
    model = _model_name(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise WireError("'prompt' must be a string (or a list of one string; token arrays are not taken)", "prompt")
    for key in body:
        if key in _COMPLETION_NEUTRAL:
            if body[key] not in _COMPLETION_NEUTRAL[key]:
                raise WireError(f"'{key}' is not supported (only {_COMPLETION_NEUTRAL[key][0]!r})", key)
        elif key not in _COMPLETION_KNOWN and key not in _IGNORED:
            raise WireError(f"unknown field '{key}'", key)
    settings = _settings(body, ("max_tokens", "stop"), max_tokens_limit)
    return ChatRequest(
        model,
        [ChatMessage("user", prompt)],
        ChatOptions.from_settings(settings),
        bool(body.get("stream", False)),
        _stream_options(body),
        True,
    )


def usage_of(done: ChatDone) -> dict[str, Any]:
    """OpenAI's ``usage`` object, with the cached prompt tokens (KV cache or prompt cache)."""
    u = done.usage
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "sampling_policy": done.sampling_policy,  # how the request's sampling was served (runtime 1.2)
    }


def _finish(done: ChatDone) -> str:
    if done.message.tool_calls:
        return "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def _tool_call_json(call: ToolCallRequest, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(dict(call.arguments), ensure_ascii=False)},
    }
    if index is not None:
        out["index"] = index
    return out


def chat_completion(done: ChatDone, completion_id: str, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object for a finished request."""
    message: dict[str, Any] = {"role": "assistant", "content": done.message.content or None}
    if done.reasoning:
        message["reasoning_content"] = done.reasoning
    if done.message.tool_calls:
        message["tool_calls"] = [_tool_call_json(c) for c in done.message.tool_calls]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": done.model,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish(done), "logprobs": None}],
        "usage": usage_of(done),
    }


def chat_chunk(event: object, completion_id: str, created: int, model: str) -> dict[str, Any] | None:
    """The ``chat.completion.chunk`` for one engine event (``None`` for events that add nothing)."""
    delta: dict[str, Any]
    finish: str | None = None
    if isinstance(event, TextDelta):
        delta = {"content": event.text}
    elif isinstance(event, ReasoningDelta):
        delta = {"reasoning_content": event.text}
    elif isinstance(event, ToolCallDelta):
        call: dict[str, Any] = {"index": event.index, "function": {"arguments": event.arguments_delta}}
        if event.id is not None:
            call.update(id=event.id, type="function")
            call["function"]["name"] = event.name
        delta = {"tool_calls": [call]}
    elif isinstance(event, ChatDone):
        delta, finish = {}, _finish(event)
    elif isinstance(event, ToolCall | InvalidToolCall):
        return None  # already streamed as ToolCallDeltas
    else:  # pragma: no cover - the engine emits only the types above
        return None
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def role_chunk(completion_id: str, created: int, model: str) -> dict[str, Any]:
    """A stream's first chunk: the assistant's role, with empty content."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
    }


def cut_chunk(completion_id: str, created: int, model: str, finish_reason: str) -> dict[str, Any]:
    """The last chunk of a stream that ends without the engine's end (cut by the server's shutdown)."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(done: ChatDone, completion_id: str, created: int) -> dict[str, Any]:
    """The chunk after the last one when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": done.model,
        "choices": [],
        "usage": usage_of(done),
    }


def new_completion_id(prefix: str = "chatcmpl") -> tuple[str, int]:
    """A fresh ``chatcmpl-…`` (or ``cmpl-…``) id and the creation time."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


def text_completion(done: ChatDone, completion_id: str, created: int) -> dict[str, Any]:
    """A ``text_completion`` object for a finished ``/v1/completions`` request."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": done.model,
        "choices": [{"index": 0, "text": done.message.content, "finish_reason": _finish(done), "logprobs": None}],
        "usage": usage_of(done),
    }


def _text_chunk(completion_id: str, created: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


@dataclass(frozen=True, slots=True)
class ChatStream:
    """The chunks of a streamed ``/v1/chat/completions`` answer.

    Attributes:
        completion_id: the ``chatcmpl-…`` id every chunk carries.
        created: the creation time every chunk carries.
        model: the model asked for.
        parallel_tool_calls: ``False`` streams the first tool call only.
    """

    completion_id: str
    created: int
    model: str
    parallel_tool_calls: bool = True

    def head(self) -> dict[str, Any] | None:
        """The chunk before any event: the assistant's role."""
        return role_chunk(self.completion_id, self.created, self.model)

    def chunk(self, event: object) -> dict[str, Any] | None:
        """The chunk for one engine event, the last one included (``None``: nothing to send)."""
        if isinstance(event, ToolCallDelta) and event.index > 0 and not self.parallel_tool_calls:
            return None
        model = event.model if isinstance(event, ChatDone) else self.model
        return chat_chunk(event, self.completion_id, self.created, model)

    def usage(self, done: ChatDone) -> dict[str, Any]:
        """The usage chunk (``stream_options.include_usage``)."""
        return usage_chunk(done, self.completion_id, self.created)

    def cut(self, finish_reason: str) -> dict[str, Any]:
        """The last chunk of a stream cut short by the server."""
        return cut_chunk(self.completion_id, self.created, self.model, finish_reason)


@dataclass(frozen=True, slots=True)
class TextStream:
    """The chunks of a streamed ``/v1/completions`` answer (text only: reasoning is not sent).

    Attributes:
        completion_id: the ``cmpl-…`` id every chunk carries.
        created: the creation time every chunk carries.
        model: the model asked for.
    """

    completion_id: str
    created: int
    model: str

    def head(self) -> dict[str, Any] | None:
        """Nothing comes before the text."""
        return None

    def chunk(self, event: object) -> dict[str, Any] | None:
        """The chunk for a text delta, or the last one for the end (``None`` for other events)."""
        if isinstance(event, TextDelta):
            return _text_chunk(self.completion_id, self.created, self.model, event.text, None)
        if isinstance(event, ChatDone):
            return _text_chunk(self.completion_id, self.created, event.model, "", _finish(event))
        return None

    def usage(self, done: ChatDone) -> dict[str, Any]:
        """The usage chunk (``stream_options.include_usage``): no choices, the usage."""
        chunk = _text_chunk(self.completion_id, self.created, done.model, "", None)
        chunk.update(choices=[], usage=usage_of(done))
        return chunk

    def cut(self, finish_reason: str) -> dict[str, Any]:
        """The last chunk of a stream cut short by the server."""
        return _text_chunk(self.completion_id, self.created, self.model, "", finish_reason)


# -- models ------------------------------------------------------------------------------------------------


def model_object(info: ModelInfo, loaded: bool) -> dict[str, Any]:
    """One model (``/v1/models/{id}``): OpenAI's fields, plus kind, context length, whether loaded, and the file."""
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "rkllm",
        "kind": info.kind,
        "context_length": info.context_size,
        "loaded": loaded,
        "file": info.filename,
    }


def models_list(infos: Sequence[ModelInfo], loaded: set[str] | frozenset[str]) -> dict[str, Any]:
    """The ``/v1/models`` list: one :func:`model_object` per model."""
    return {"object": "list", "data": [model_object(info, info.name in loaded) for info in infos]}


# -- embeddings and rerank ---------------------------------------------------------------------------------


def embedding_request(body: Any) -> tuple[str, list[str], str]:
    """Read a ``/v1/embeddings`` body: ``(model, texts, encoding_format)``."""
    if not isinstance(body, dict):
        raise WireError("the body must be a JSON object")
    model = _model_name(body)
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise WireError("'input' must be a string or a non-empty list of strings (token arrays are not taken)", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise WireError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise WireError("'dimensions' is not supported: the model's vectors have a fixed size", "dimensions")
    return model, texts, encoding


def embeddings_response(vectors: Sequence[Sequence[float]], model: str, tokens: int, encoding: str) -> dict[str, Any]:
    """OpenAI's embeddings list."""
    import base64
    from array import array

    def encode(v: Sequence[float]) -> Any:
        return base64.b64encode(array("f", v).tobytes()).decode() if encoding == "base64" else list(v)

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def rerank_request(body: Any) -> tuple[str, str, list[str], int | None, bool]:
    """Read a ``/v1/rerank`` body (the Cohere/Jina shape): ``(model, query, documents, top_n, return_documents)``."""
    if not isinstance(body, dict):
        raise WireError("the body must be a JSON object")
    model = _model_name(body)
    query = _require(body, "query", str)
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise WireError("'documents' must be a non-empty list", "documents")
    texts = []
    for i, doc in enumerate(docs):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise WireError(f"'documents[{i}]' must be a string or an object with 'text'", f"documents[{i}]")
        texts.append(text)
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise WireError("'top_n' must be a positive integer", "top_n")
    return model, query, texts, top_n, bool(body.get("return_documents", True))


def rerank_response(
    scores: Sequence[float], documents: Sequence[str], model: str, tokens: int, top_n: int | None, with_docs: bool
) -> dict[str, Any]:
    """Results best first, each with its input ``index`` and ``relevance_score``."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: top_n or len(scores)]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if with_docs:
            item["document"] = {"text": documents[i]}
        results.append(item)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results, "usage": {"total_tokens": tokens}}
