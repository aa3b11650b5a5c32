"""Ollama's wire format, both ways: request bodies to core types, core results to response bodies.

Pure functions over dicts, with no HTTP in them, as :mod:`.wire` is for OpenAI. A bad field raises
:class:`~.wire.WireError` naming it, which the router in :mod:`.ollama` answers with Ollama's
``{"error": "..."}`` and status 400.

Conventions the clients check: durations are nanoseconds; names are ``name:tag`` and the only tag
is ``latest`` (a name without a tag means ``latest``); tool-call arguments are JSON objects, not
strings; ``options`` carry the sampling settings under Ollama's names (``num_predict`` is the
output limit); every option of Ollama's own runner that has no meaning here (``num_ctx``,
``seed``, ``num_gpu``, ...) is accepted and ignored, and an option or a field nobody knows is
logged and ignored, as Ollama does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..chat.engine import ChatDone, InvalidToolCall, ReasoningDelta, TextDelta, ToolCall, ToolCallDelta
from ..chat.messages import ChatMessage, ToolCallRequest
from ..chat.options import ChatOptions
from ..chat.templates import template_for_family
from ..errors import ModelNotFoundError
from ..models.registry import ModelInfo
from ..params import SAMPLING_FIELDS
from .wire import WireError, _model_name
from .wire_images import ImagePolicy, ollama_images

__all__ = [
    "DEFAULT_TAG",
    "ChatRequest",
    "EmbedRequest",
    "GenerateRequest",
    "Timings",
    "chat_chunk",
    "chat_request",
    "chat_response",
    "embed_request",
    "embed_response",
    "embeddings_request",
    "generate_chunk",
    "generate_request",
    "generate_response",
    "keep_alive_seconds",
    "load_response",
    "model_name",
    "ps_response",
    "rfc3339",
    "show_request",
    "show_response",
    "tagged",
    "tags_response",
]

logger = logging.getLogger(__name__)

DEFAULT_TAG = "latest"
"""The one tag every model has."""

# Options that Ollama's own runner takes and that mean nothing on the NPU runtime (the context size is
# fixed when the model is converted; the runtime has no seed): accepted, so that clients sending them work.
_IGNORED_OPTIONS = frozenset(
    {
        "num_ctx",
        "seed",
        "num_keep",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "embedding_only",
        "num_thread",
        "numa",
        "tfs_z",
        "typical_p",
        "min_p",
        "repeat_last_n",
        "penalize_newline",
        "rope_frequency_base",
        "rope_frequency_scale",
    }
)
_COMMON = (
    "model",
    "format",
    "options",
    "stream",
    "keep_alive",
    "think",
    "truncate",
    "shift",
    "logprobs",
    "top_logprobs",
)
_CHAT_KNOWN = frozenset({*_COMMON, "messages", "tools"})
_GENERATE_KNOWN = frozenset({*_COMMON, "prompt", "suffix", "images", "system", "template", "raw", "context"})


# -- names ---------------------------------------------------------------------------------------------------


def model_name(body: Mapping[str, Any], key: str = "model") -> str:
    """The registry name a request means: its ``model`` (or ``key``) without the ``:latest`` tag.

    Raises:
        WireError: the field is missing or not a string.
        ModelNotFoundError: a path (never opened), or a tag other than ``latest``.
    """
    if key != "model" and "model" not in body and key in body:
        body = {"model": body[key]}
    name = _model_name(body)
    base, sep, tag = name.rpartition(":")
    if not sep:
        return name
    if tag != DEFAULT_TAG or not base:
        raise ModelNotFoundError(f"model '{name}' not found: the only tag this server knows is ':{DEFAULT_TAG}'")
    return base


def tagged(name: str) -> str:
    """``name`` as Ollama lists it (``qwen3-0.6b:latest``)."""
    return f"{name}:{DEFAULT_TAG}"


# -- keep_alive ----------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """A ``keep_alive`` as seconds: ``None`` when absent, negative for "forever", 0 for "unload now".

    A number is seconds; a string is a Go duration (``"5m"``, ``"1h30m"``, ``"-1s"``) or a number.

    Raises:
        WireError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    raise WireError(f"'keep_alive' must be seconds or a duration such as '5m', not {value!r}", "keep_alive")


# -- requests ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """An ``/api/chat`` request, read.

    Attributes:
        model: the registry name (tag removed).
        messages: the conversation (empty: load or unload the model, nothing else).
        options: the chat options (sampling, limit, stop, tools, format, thinking).
        stream: NDJSON chunks (the default) or one object.
        keep_alive: seconds, as :func:`keep_alive_seconds` gives them.
    """

    model: str
    messages: list[ChatMessage]
    options: ChatOptions
    stream: bool
    keep_alive: float | None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """An ``/api/generate`` request, read: a system prompt and one user turn.

    Attributes:
        model: the registry name (tag removed).
        messages: the system prompt (if any) and the prompt as a user message; empty for an empty prompt.
        options: the chat options.
        stream: NDJSON chunks (the default) or one object.
        keep_alive: seconds, as :func:`keep_alive_seconds` gives them.
    """

    model: str
    messages: list[ChatMessage]
    options: ChatOptions
    stream: bool
    keep_alive: float | None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise WireError("the body must be a JSON object")
    return body


def _check_known(body: Mapping[str, Any], known: frozenset[str]) -> None:
    """Ignore fields nobody knows, as Ollama does (logged); refuse what this server cannot honour."""
    for key in body:
        if key not in known:
            logger.warning("ignoring unknown Ollama request field %r", key)
    if body.get("logprobs") or body.get("top_logprobs"):
        param = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise WireError("log probabilities are not supported: the runtime does not report them", param)


def _settings(body: Mapping[str, Any], max_tokens_limit: int | None) -> dict[str, Any]:
    """``options``, ``format``, ``think`` and ``tools`` under the names :meth:`ChatOptions.from_settings` takes."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise WireError("'options' must be an object", "options")
    settings: dict[str, Any] = {}
    for key, value in options.items():
        if value is None or key in _IGNORED_OPTIONS:
            continue
        if key in SAMPLING_FIELDS:
            settings[key] = value
        elif key == "stop":
            settings["stop"] = value
        elif key == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise WireError("'options.num_predict' must be an integer", "options.num_predict")
            if value >= 0:  # -1 (no limit) and -2 (fill the context) leave the model's own limit
                if max_tokens_limit is not None and value > max_tokens_limit:
                    raise WireError(
                        f"num_predict={value} is above this server's limit of {max_tokens_limit}", "options.num_predict"
                    )
                settings["max_tokens"] = value
        else:
            logger.warning("ignoring unknown Ollama option %r", key)
    fmt = body.get("format")
    if fmt == "json":
        settings["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        settings["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise WireError("'format' must be \"json\" or a JSON schema object", "format")
    think = body.get("think")
    if think not in (None, False, True, "low", "medium", "high"):
        raise WireError('\'think\' must be true, false, "low", "medium" or "high"', "think")
    if think not in (None, False):
        settings["enable_thinking"] = True
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise WireError("'tools' must be a list of tool objects", "tools")
        settings["tools"] = tools
    return settings


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise WireError(f"'{where}' is not JSON: {exc}", where) from exc
    if arguments is None:
        return {}
    if not isinstance(arguments, dict):
        raise WireError(f"'{where}' must be a JSON object", where)
    return arguments


def _messages(value: Any, images: ImagePolicy) -> list[ChatMessage]:
    """Ollama's messages; tool results are matched to the calls before them by ``tool_name``, else in order."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise WireError("'messages' must be a list", "messages")
    out: list[ChatMessage] = []
    open_calls: list[ToolCallRequest] = []
    for i, m in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise WireError(f"'{at}' must be an object", at)
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise WireError(f"'{at}.role' must be system, user, assistant or tool, not {role!r}", f"{at}.role")
        parts = ollama_images(m.get("images"), f"{at}.images", role, images)
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise WireError(f"'{at}.content' must be a string", f"{at}.content")
        calls: tuple[ToolCallRequest, ...] = ()
        call_id = None
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise WireError(f"'{at}.tool_calls' must be a list", f"{at}.tool_calls")
            built = []
            for j, call in enumerate(m["tool_calls"]):
                where = f"{at}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise WireError(f"'{where}' must be an object with a 'function' that has a 'name'", where)
                ident = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
                built.append(
                    ToolCallRequest(ident, fn["name"], _arguments(fn.get("arguments"), f"{where}.function.arguments"))
                )
            calls = tuple(built)
            open_calls = list(calls)
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            match = next((c for c in open_calls if c.name == name), open_calls[0] if open_calls else None)
            if match is not None:
                open_calls.remove(match)
                call_id = match.id
        out.append(ChatMessage(role, content, tool_calls=calls, tool_call_id=call_id, images=parts))
    return out


def chat_request(body: Any, *, max_tokens_limit: int | None = None, images: ImagePolicy | None = None) -> ChatRequest:
    """Read an ``/api/chat`` body (a user message's ``images`` are bare base64 strings).

    Raises:
        WireError: a missing or malformed field (named), bad images, or an unknown field.
        ModelNotFoundError: a path or an unknown tag in ``model``.
        InvalidParameterError: a value out of range (from :class:`ChatOptions`).
    """
    body = _object(body)
    model = model_name(body)
    _check_known(body, _CHAT_KNOWN)
    messages = _messages(body.get("messages"), images or ImagePolicy())
    options = ChatOptions.from_settings(_settings(body, max_tokens_limit))
    return ChatRequest(
        model, messages, options, body.get("stream") is not False, keep_alive_seconds(body.get("keep_alive"))
    )


def generate_request(
    body: Any, *, max_tokens_limit: int | None = None, images: ImagePolicy | None = None
) -> GenerateRequest:
    """Read an ``/api/generate`` body (``raw``, ``template``, ``suffix`` and ``context`` are refused when set).

    ``images`` (bare base64 strings) go with the prompt, before its text.

    Raises:
        WireError: a missing or malformed field (named), bad images, or a field this server cannot honour.
        ModelNotFoundError: a path or an unknown tag in ``model``.
        InvalidParameterError: a value out of range (from :class:`ChatOptions`).
    """
    body = _object(body)
    model = model_name(body)
    _check_known(body, _GENERATE_KNOWN)
    parts = ollama_images(body.get("images"), "images", "user", images or ImagePolicy())
    for key in ("raw", "template", "suffix", "context"):
        if body.get(key):
            raise WireError(f"'{key}' is not supported: prompts always go through the model's chat template", key)
    prompt = body.get("prompt") or ""
    system = body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise WireError("'prompt' and 'system' must be strings", "prompt" if not isinstance(prompt, str) else "system")
    messages = []
    if prompt or parts:
        if system:
            messages.append(ChatMessage("system", system))
        messages.append(ChatMessage("user", prompt, images=parts))
    options = ChatOptions.from_settings(_settings(body, max_tokens_limit))
    return GenerateRequest(
        model, messages, options, body.get("stream") is not False, keep_alive_seconds(body.get("keep_alive"))
    )


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """An ``/api/embed`` or ``/api/embeddings`` request, read."""

    model: str
    texts: list[str]
    truncate: bool


def embed_request(body: Any) -> EmbedRequest:
    """Read an ``/api/embed`` body: ``input`` is a string or a list of strings.

    Raises:
        WireError: a missing or malformed field, or ``dimensions`` (the vectors have a fixed size).
        ModelNotFoundError: a path or an unknown tag in ``model``.
    """
    body = _object(body)
    model = model_name(body)
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise WireError("'input' must be a string or a non-empty list of strings", "input")
    if body.get("dimensions") is not None:
        raise WireError("'dimensions' is not supported: the model's vectors have a fixed size", "dimensions")
    return EmbedRequest(model, texts, body.get("truncate") is not False)


def embeddings_request(body: Any) -> EmbedRequest:
    """Read an ``/api/embeddings`` body (the older endpoint): one ``prompt``.

    Raises:
        WireError: a missing or malformed ``prompt``.
        ModelNotFoundError: a path or an unknown tag in ``model``.
    """
    body = _object(body)
    model = model_name(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise WireError("'prompt' must be a string", "prompt")
    return EmbedRequest(model, [prompt], True)


def show_request(body: Any) -> str:
    """Read an ``/api/show`` body: the registry name from ``model`` (or ``name``, as older clients send).

    Raises:
        WireError: neither field is there.
        ModelNotFoundError: a path or an unknown tag.
    """
    body = _object(body)
    return model_name(body, "name")


# -- responses -----------------------------------------------------------------------------------------------


def rfc3339(when: datetime) -> str:
    """A time as Ollama writes it: RFC 3339 in UTC with a ``Z``."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Timings:
    """A request's phases, measured, in nanoseconds.

    Attributes:
        total: from the request's arrival to its end.
        load: loading the model, when this request loaded it (else 0).
        prompt_eval: from the arrival to the first token, less the load: the prefill, and any wait
            for the model's turn on the NPU.
        eval: from the first token to the last.
    """

    total: int
    load: int = 0
    prompt_eval: int = 0
    eval: int = 0


def _done_reason(done: ChatDone) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _prompt_tokens(done: ChatDone) -> int:
    """The prompt tokens the runtime evaluated for this request (those from the KV cache are not counted).

    Without the runtime's perf stats (some runs report none), the whole input, as the engine counted it.
    """
    return done.usage.prefilled_tokens if done.stats is not None else done.usage.input_tokens


def _metrics(done: ChatDone, timings: Timings) -> dict[str, Any]:
    """The final chunk's fields: the runtime's token counts and the measured durations."""
    return {
        "done": True,
        "done_reason": _done_reason(done),
        "total_duration": timings.total,
        "load_duration": timings.load,
        "prompt_eval_count": _prompt_tokens(done),
        "prompt_eval_duration": timings.prompt_eval,
        "eval_count": done.usage.output_tokens,
        "eval_duration": timings.eval,
    }


def _tool_calls(calls: Sequence[ToolCallRequest | ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": dict(c.arguments)}} for c in calls]


def chat_chunk(event: object, model: str, created_at: str) -> dict[str, Any] | None:
    """The ``/api/chat`` chunk for one engine event (``None`` for events that add nothing).

    Tool calls are sent whole, as Ollama does, when the model closes each call.
    """
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    if isinstance(event, TextDelta):
        message["content"] = event.text
    elif isinstance(event, ReasoningDelta):
        message["thinking"] = event.text
    elif isinstance(event, ToolCall):
        message["tool_calls"] = _tool_calls([event])
    elif isinstance(event, ToolCallDelta | InvalidToolCall | ChatDone):
        return None
    else:  # pragma: no cover - the engine emits only the types above
        return None
    return {"model": tagged(model), "created_at": created_at, "message": message, "done": False}


def chat_response(done: ChatDone, created_at: str, timings: Timings, *, whole: bool) -> dict[str, Any]:
    """The last ``/api/chat`` object: the whole message when ``whole`` (no streaming), else an empty one."""
    message: dict[str, Any] = {"role": "assistant", "content": done.message.content if whole else ""}
    if whole and done.reasoning:
        message["thinking"] = done.reasoning
    if whole and done.message.tool_calls:
        message["tool_calls"] = _tool_calls(done.message.tool_calls)
    return {"model": tagged(done.model), "created_at": created_at, "message": message, **_metrics(done, timings)}


def generate_chunk(event: object, model: str, created_at: str) -> dict[str, Any] | None:
    """The ``/api/generate`` chunk for one engine event (``None`` for events that add nothing)."""
    out: dict[str, Any] = {"model": tagged(model), "created_at": created_at, "response": "", "done": False}
    if isinstance(event, TextDelta):
        out["response"] = event.text
    elif isinstance(event, ReasoningDelta):
        out["thinking"] = event.text
    else:
        return None
    return out


def generate_response(done: ChatDone, created_at: str, timings: Timings, *, whole: bool) -> dict[str, Any]:
    """The last ``/api/generate`` object: the whole text when ``whole`` (no streaming), else empty."""
    out: dict[str, Any] = {
        "model": tagged(done.model),
        "created_at": created_at,
        "response": done.message.content if whole else "",
    }
    if whole and done.reasoning:
        out["thinking"] = done.reasoning
    out.update(_metrics(done, timings))
    return out


def load_response(model: str, created_at: str, reason: str, *, chat: bool) -> dict[str, Any]:
    """The answer to an empty prompt (``reason`` ``load``) or to one with ``keep_alive: 0`` (``unload``)."""
    out: dict[str, Any] = {"model": tagged(model), "created_at": created_at}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason=reason)
    return out


def embed_response(vectors: Sequence[Sequence[float]], model: str, tokens: int, timings: Timings) -> dict[str, Any]:
    """The ``/api/embed`` answer."""
    return {
        "model": tagged(model),
        "embeddings": [list(v) for v in vectors],
        "total_duration": timings.total,
        "load_duration": timings.load,
        "prompt_eval_count": tokens,
    }


# -- models --------------------------------------------------------------------------------------------------


def _digest(info: ModelInfo, modified: datetime) -> str:
    """An identity for the file (name, size, time), not a hash of its bytes (that would read gigabytes)."""
    key = f"{info.filename}\0{info.file_size}\0{modified.timestamp()}"
    return hashlib.sha256(key.encode()).hexdigest()


def _details(info: ModelInfo) -> dict[str, Any]:
    family = info.facts.family or info.kind
    return {
        "parent_model": "",
        "format": "rkllm",
        "family": family,
        "families": [family],
        "parameter_size": (info.facts.size or "").upper(),
        "quantization_level": (info.dtype or "").upper(),
    }


def _entry(info: ModelInfo, modified: datetime) -> dict[str, Any]:
    return {
        "name": tagged(info.name),
        "model": tagged(info.name),
        "modified_at": rfc3339(modified),
        "size": info.file_size,
        "digest": _digest(info, modified),
        "details": _details(info),
    }


def tags_response(models: Sequence[tuple[ModelInfo, datetime]]) -> dict[str, Any]:
    """``/api/tags``: every model with its file's modification time, listed as ``name:latest``."""
    return {"models": [_entry(info, modified) for info, modified in models]}


def _capabilities(info: ModelInfo) -> list[str]:
    if info.kind == "embedding":
        return ["embedding"]
    if info.kind != "chat":
        return []
    template = template_for_family(info.facts.family)
    return ["completion", "tools", *(["thinking"] if template is not None and template.thinking else [])]


def show_response(info: ModelInfo, modified: datetime) -> dict[str, Any]:
    """``/api/show``: details, ``model_info`` with ``<family>.context_length``, and capabilities."""
    family = info.facts.family or info.kind
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(info),
        "model_info": {
            "general.architecture": family,
            "general.basename": info.name,
            "general.file": info.filename,
            f"{family}.context_length": info.context_size,
        },
        "capabilities": _capabilities(info),
        "modified_at": rfc3339(modified),
    }


def ps_response(loaded: Sequence[tuple[ModelInfo, float, datetime, datetime]]) -> dict[str, Any]:
    """``/api/ps``: each loaded model with its memory (MB), file time, and until when it is meant to stay."""
    models = []
    for info, memory_mb, modified, expires in loaded:
        entry = _entry(info, modified)
        size = int(memory_mb * 1024 * 1024)
        entry.update(size=size, expires_at=rfc3339(expires), size_vram=size, context_length=info.context_size)
        models.append(entry)
    return {"models": models}


# -- pull ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PullRequest:
    """An ``/api/pull`` request.

    Attributes:
        model: what to pull: a Hugging Face reference (``hf.co/OWNER/REPO[/FILE]``, ``hf.co/OWNER/REPO:TAG``,
            ``OWNER/REPO[/FILE.rkllm]``) or the name of a model this server has already.
        stream: progress as NDJSON lines (the default), or one object at the end.
    """

    model: str
    stream: bool


def pull_request(body: Any) -> PullRequest:
    """Read an ``/api/pull`` body: ``model`` (or ``name``, as older clients send) and ``stream``.

    Raises:
        WireError: no model, or not a string.
    """
    body = _object(body)
    model = body.get("model", body.get("name"))
    if not isinstance(model, str) or not model.strip():
        raise WireError("'model' is required: a Hugging Face reference such as hf.co/OWNER/REPO", "model")
    return PullRequest(model.strip(), body.get("stream") is not False)


def pull_status(
    status: str, file: str | None = None, total: int | None = None, completed: int | None = None
) -> dict[str, Any]:
    """One ``/api/pull`` progress object: ``status``; while a file downloads, its ``digest``, ``total``, ``completed``.

    Ollama's ``digest`` names a layer; here it names the file being downloaded, which is what clients use it for
    (telling the progress of one download from another's).
    """
    line: dict[str, Any] = {"status": status}
    if file is not None and total is not None:
        line.update(digest=file, total=total, completed=completed or 0)
    return line
