"""The options of a chat request, and the one place where the frameworks' spellings are understood.

LangChain, LlamaIndex and OpenAI-style clients name the same settings
differently (``max_tokens`` / ``max_new_tokens``, ``reasoning`` / ``thinking``, a
tool choice as a string, a bool or a dict, ``response_format`` for JSON mode).
:meth:`ChatOptions.from_settings` takes any of these spellings and returns
validated options, so adapters only translate their messages and events.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import InvalidParameterError
from ..params import SAMPLING_FIELDS as _RUNTIME_SAMPLING
from ..params import SamplingParams, check_text
from .parse import StopSequenceFilter

__all__ = [
    "SAMPLING_FIELDS",
    "SETTINGS",
    "ChatOptions",
    "check_tool",
    "ToolChoice",
    "json_instruction",
    "normalise_tool_choice",
    "normalise_tools",
]

ToolChoice = str | None
"""``None``/``"auto"``, ``"none"``, ``"required"``, or a tool name (see :func:`normalise_tool_choice`)."""

_MIROSTAT_FIELDS: Final = ("mirostat", "mirostat_tau", "mirostat_eta")
SAMPLING_FIELDS: Final = tuple(name for name in _RUNTIME_SAMPLING if name not in _MIROSTAT_FIELDS)
"""Sampling settings every adapter exposes as its own fields, under these names.

Every :data:`rkllm_core.params.SAMPLING_FIELDS` but the runtime's mirostat settings, which
:meth:`ChatOptions.from_settings` still understands (and the server takes); the adapters read
one attribute per name here.
"""

_MAX_TOKENS_NAMES: Final = ("max_new_tokens", "max_tokens", "max_completion_tokens")
_THINKING_NAMES: Final = ("enable_thinking", "thinking", "reasoning")
_OTHER_NAMES: Final = ("stop", "tools", "tool_choice", "response_format", "timeout")
_TOOL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ALIASES: Final = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "thinking": "enable_thinking",
    "reasoning": "enable_thinking",
}
SETTINGS: Final = frozenset({*_RUNTIME_SAMPLING, *_MAX_TOKENS_NAMES, *_THINKING_NAMES, *_OTHER_NAMES})
"""Every key :meth:`ChatOptions.from_settings` understands."""


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """Settings of one chat request.

    Attributes:
        sampling: sampling settings (per run on the 1.3 ABI; an instance per setting on 1.2).
        max_new_tokens: output limit (``None``: the model's default).
        stop: stop sequences; the text stops before the first one found.
        enable_thinking: let the model reason in a ``<think>`` block (reported separately).
        tools: OpenAI-style tool definitions.
        tool_choice: ``None``/``"auto"``, ``"none"``, ``"required"`` or a tool name.
        response_format: ``{"type": "json_object"}`` (optionally with ``"schema"``) or
            ``{"type": "json_schema", "json_schema": {"schema": {...}}}``: the prompt asks
            for JSON (decoding cannot be constrained).
        timeout: seconds to wait for the model (its turn on the handle, room to load it)
            before ``BusyError``; the generation itself is bounded by ``max_new_tokens``.
        allow_remote_images: fetch ``http(s)`` image URLs (with size and time limits); off by
            default, and the server turns it on only when told to.
    """

    sampling: SamplingParams | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    enable_thinking: bool = False
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: ToolChoice = None
    response_format: Mapping[str, Any] | None = None
    timeout: float | None = None
    allow_remote_images: bool = False

    def __post_init__(self) -> None:
        """Validate limits, stops, tools, tool choice and response format."""
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1
        ):
            raise InvalidParameterError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            raise InvalidParameterError("stop must be a sequence of strings, not a single string")
        StopSequenceFilter(self.stop)  # validates every stop string
        for i, stop in enumerate(self.stop):
            check_text(stop, f"stop sequence #{i}")
        if self.timeout is not None and (
            isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float) or math.isnan(self.timeout)
        ):
            raise InvalidParameterError("timeout must be a number of seconds")
        for i, tool in enumerate(self.tools):
            check_tool(tool, i)
        names = self.tool_names()
        if self.tool_choice not in (None, "auto", "none", "required", "any") and self.tool_choice not in names:
            raise InvalidParameterError(
                f"tool_choice must be 'auto', 'none', 'required' ('any') or one of the tool names {list(names)}; "
                f"got {self.tool_choice!r}"
            )
        if self.response_format is not None:
            json_instruction(self.response_format)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ChatOptions:
        """Options from settings spelled the way LangChain, LlamaIndex or OpenAI spell them.

        Keys (``None`` values are ignored): the sampling names in
        :data:`SAMPLING_FIELDS` and the runtime's ``mirostat``, ``mirostat_tau`` and
        ``mirostat_eta`` (every :class:`SamplingParams` field); ``max_new_tokens`` / ``max_tokens`` /
        ``max_completion_tokens``; ``stop`` (a string or a list); ``enable_thinking`` /
        ``thinking`` / ``reasoning``; ``tools`` (OpenAI-style dicts); ``tool_choice`` in
        any form :func:`normalise_tool_choice` takes; ``response_format``; ``timeout``.

        Args:
            settings: e.g. an adapter's fields.
            overrides: e.g. one call's keyword arguments: a value set here, in any of
                the spellings, replaces the one in ``settings``.

        Raises:
            InvalidParameterError: an unknown key or a bad value (naming the key).
        """
        values = _canonical(settings)
        values.update(_canonical(overrides or {}))
        sampling = SamplingParams(**{k: values[k] for k in _RUNTIME_SAMPLING if k in values})
        max_new = values.get("max_new_tokens")
        thinking = values.get("enable_thinking", False)
        stop = values.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        tools = tuple(values.get("tools", ()))
        names = [_tool_name(t) for t in tools]
        choice = normalise_tool_choice(values.get("tool_choice"), names)
        return cls(
            sampling=None if sampling.is_empty() else sampling,
            max_new_tokens=max_new,
            stop=tuple(stop),
            enable_thinking=bool(thinking),
            tools=tools,
            tool_choice=choice if tools else None,
            response_format=values.get("response_format"),
            timeout=values.get("timeout"),
        )

    def tool_names(self) -> tuple[str, ...]:
        """Names of the tools, in order."""
        return tuple(_tool_name(t) for t in self.tools)

    @property
    def forces_tool_call(self) -> bool:
        """True when some tool must be called (``"required"``/``"any"``)."""
        return self.tool_choice in ("required", "any") and bool(self.tools)

    @property
    def active_tools(self) -> tuple[Mapping[str, Any], ...]:
        """The tools offered to the model (none when ``tool_choice`` is ``"none"``)."""
        return () if self.tool_choice == "none" else self.tools


def normalise_tool_choice(choice: Any, names: Sequence[str]) -> str | None:
    """A tool choice in any common form, as ``None``, ``"auto"``, ``"none"``, ``"required"`` or a tool name.

    Accepted: ``None``/``False``; ``True`` (the single tool); ``"auto"``, ``"none"``,
    ``"any"``/``"required"``, a tool name; ``{"type": "function", "function": {"name": ...}}``,
    ``{"name": ...}``, ``{"type": "any" | "required" | "auto" | "none"}``.

    Raises:
        InvalidParameterError: a form that names no known choice (or a tool that is not offered).
    """
    if choice is None or choice is False:
        return None
    if choice is True:
        if len(names) != 1:
            raise InvalidParameterError(f"tool_choice=True needs exactly one tool, got {len(names)}: {list(names)}")
        return names[0]
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        if isinstance(name, str):
            choice = name
        elif choice.get("type") in ("any", "required", "auto", "none"):
            choice = str(choice["type"])
        else:
            raise InvalidParameterError(f"tool_choice dict must name a function, got {choice!r}")
    if not isinstance(choice, str):
        raise InvalidParameterError(f"tool_choice must be a str, bool, dict or None, got {type(choice).__name__}")
    if choice == "any":
        choice = "required"
    if choice in ("auto", "none", "required") or choice in names:
        return str(choice)
    raise InvalidParameterError(
        f"tool_choice must be 'auto', 'none', 'any', 'required' or a tool name {list(names)}; got {choice!r}"
    )


def json_instruction(response_format: Mapping[str, Any]) -> str:
    """The instruction appended to the prompt for a ``response_format``.

    ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` asks for an
    instance of the schema; ``{"type": "json_object"}`` (optionally with a
    ``"schema"``) asks for a JSON object.

    Raises:
        InvalidParameterError: an unknown format.
    """
    if not isinstance(response_format, Mapping):
        raise InvalidParameterError(f"response_format must be a dict, got {type(response_format).__name__}")
    kind = response_format.get("type")
    schema: Any = None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidParameterError('response_format "json_schema" needs {"json_schema": {"schema": {...}}}')
    elif kind == "json_object":
        schema = response_format.get("schema")
    else:
        raise InvalidParameterError(f"response_format type must be 'json_schema' or 'json_object', got {kind!r}")
    if schema:
        return "Respond with a JSON object matching this JSON schema: " + json.dumps(schema, ensure_ascii=False)
    return "Respond with a JSON object only, with no other text."


def check_tool(tool: Any, index: int = 0) -> None:
    """Check one tool definition against the function-calling subset the frameworks produce.

    ``{"type": "function", "function": {...}}`` or the bare function object, with a
    ``name`` (a word of letters, digits, ``_``, ``-`` or ``.``, at most 64 long), an
    optional ``description`` (text) and optional ``parameters``: a JSON schema object
    (``"type": "object"`` when a type is given, ``properties`` a mapping of schemas,
    ``required`` a list of property names), serialisable as strict JSON (no NaN).

    Raises:
        InvalidParameterError: naming the tool (its index, and its name when it has one).
    """
    if not isinstance(tool, Mapping):
        raise InvalidParameterError(f"tool #{index} must be a dict, got {type(tool).__name__}")
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(fn, Mapping):
        raise InvalidParameterError(f"tool #{index}: expected an OpenAI-style function tool, got {dict(tool)!r:.120}")
    name = fn.get("name")
    if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
        raise InvalidParameterError(
            f"tool #{index}: the name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}"
        )
    where = f"tool {name!r}"
    description = fn.get("description")
    if description is not None:
        check_text(description, f"{where} description")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, Mapping):
            raise InvalidParameterError(f"{where}: parameters must be a JSON schema object, got {params!r:.80}")
        if params.get("type", "object") != "object":
            raise InvalidParameterError(f"{where}: parameters must be of type 'object', got {params.get('type')!r}")
        props = params.get("properties", {})
        if not isinstance(props, Mapping) or not all(isinstance(v, Mapping) for v in props.values()):
            raise InvalidParameterError(f"{where}: parameters.properties must map names to schemas")
        required = params.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise InvalidParameterError(f"{where}: parameters.required must be a list of property names")
    try:
        text = json.dumps(tool, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{where} is not valid JSON: {exc}") from exc
    check_text(text, f"{where} definition")


def _canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k in settings if k not in SETTINGS)
    if unknown:
        supported = ", ".join(sorted(SETTINGS))
        raise InvalidParameterError(f"unsupported setting(s) {', '.join(unknown)}; supported: {supported}")
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is not None:
            out[_ALIASES.get(key, key)] = value
    return out


def _tool_name(tool: Mapping[str, Any]) -> str:
    if not isinstance(tool, Mapping):
        raise InvalidParameterError(f"a tool definition must be a dict, got {type(tool).__name__}")
    fn = tool.get("function", tool)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InvalidParameterError(f"a tool definition has no name: {tool!r}")
    return name


def normalise_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """Return tools as canonical JSON (OpenAI ``{"type": "function", "function": {...}}`` form).

    Raises:
        InvalidParameterError: a tool has no name or is not JSON-serialisable.
    """
    out = []
    for tool in tools:
        _tool_name(tool)
        out.append(dict(tool) if "function" in tool else {"type": "function", "function": dict(tool)})
    try:
        return json.dumps(out, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"tool definitions are not JSON-serialisable: {exc}") from exc
