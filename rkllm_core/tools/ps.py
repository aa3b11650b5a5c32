"""``rkllm ps``: the models a running ``rkllm serve`` has loaded (its ``GET /api/ps``).

The server is ``--url``, else ``RKLLM_SERVER_URL``, else ``http://127.0.0.1:8080``;
``RKLLM_API_KEY``, when set, is sent as ``Authorization: Bearer ...``.
"""

# ruff: noqa: T201 - a command line prints

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from .table import table

__all__ = ["DEFAULT_URL", "add_parser", "cmd_ps", "fetch_ps", "until"]

DEFAULT_URL = "http://127.0.0.1:8080"
ENV_URL = "RKLLM_SERVER_URL"
ENV_KEY = "RKLLM_API_KEY"
TIMEOUT_S = 10.0


class ServerUnreachable(Exception):
    """The server did not answer, or not with a model list."""


def fetch_ps(url: str, api_key: str | None = None, timeout: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """The ``models`` of the server's ``GET /api/ps``.

    Raises:
        ServerUnreachable: nothing answers at ``url``, or the answer is an error or not a model list.
    """
    if not url.startswith(("http://", "https://")):
        raise ServerUnreachable(f"{url!r} is not an http:// or https:// URL")
    try:
        request = urllib.request.Request(url.rstrip("/") + "/api/ps")
        if api_key:
            request.add_header("Authorization", f"Bearer {api_key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) URL of the user
            raw = response.read()
    except urllib.error.HTTPError as exc:
        hint = " (set RKLLM_API_KEY)" if exc.code == 401 else ""
        raise ServerUnreachable(f"{url} answered HTTP {exc.code} {exc.reason}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerUnreachable(f"no rkllm server at {url} ({reason}); start one with `rkllm serve`") from exc
    except (ValueError, http.client.InvalidURL) as exc:  # a bad port, a broken IPv6 address
        raise ServerUnreachable(f"{url!r} is not a usable URL: {exc}") from exc
    except http.client.HTTPException as exc:
        raise ServerUnreachable(f"{url} did not answer as an HTTP server ({type(exc).__name__})") from exc
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise ServerUnreachable(f"{url} did not answer with JSON: {exc}") from exc
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list):
        raise ServerUnreachable(f"{url}/api/ps did not answer with a model list")
    return models


def until(expires_at: str | None, now: datetime | None = None) -> str:
    """How long a model is meant to stay loaded, from an RFC 3339 time: ``4 minutes from now``, ``forever``."""
    if not expires_at:
        return ""
    try:
        when = datetime.fromisoformat(expires_at)
    except ValueError:
        return expires_at
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds > 365 * 86400:
        return "forever"
    if seconds <= 0:
        return "now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} from now"
    return "less than a minute from now"


def _rows(models: list[dict[str, Any]]) -> list[dict[str, object]]:
    return [
        {
            "name": str(m.get("name") or m.get("model") or "").removesuffix(":latest"),  # Ollama's tag
            "size_mb": round(float(m.get("size") or 0) / (1024 * 1024), 1),
            "context": m.get("context_length"),
            "until": until(m.get("expires_at")),
        }
        for m in models
    ]


def cmd_ps(args: argparse.Namespace) -> int:
    """Print the models a running server has loaded."""
    url = args.url or os.environ.get(ENV_URL) or DEFAULT_URL
    try:
        models = fetch_ps(url, os.environ.get(ENV_KEY) or None)
    except ServerUnreachable as exc:
        print(f"rkllm: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no models loaded ({url})")
        return 0
    columns = [("name", "NAME"), ("size_mb", "SIZE_MB"), ("context", "CONTEXT"), ("until", "UNTIL")]
    print(table(_rows(models), columns))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rkllm ps`` to the ``rkllm`` parser."""
    p = sub.add_parser("ps", help="the models a running `rkllm serve` has loaded")
    p.add_argument("--url", help=f"the server (default: {ENV_URL}, else {DEFAULT_URL})")
    p.add_argument("--json", action="store_true", help="print the server's /api/ps models as JSON")
    p.set_defaults(func=cmd_ps)
