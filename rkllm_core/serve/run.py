"""Run the server: command-line arguments, start-up report, uvicorn, the service's life cycle.

Life cycle: the models named by ``--preload`` are loaded first (a bad name ends the start with a
message and exit 2). The first SIGTERM or SIGINT (Ctrl-C) stops accepting connections and lets the
requests in flight finish; those still running after ``--shutdown-timeout`` seconds are aborted,
each stream ending cleanly (see :mod:`.openai`). A second signal aborts them at once. Either way
every handle is destroyed, ``rkllm serve: stopped`` is printed, and the exit status is 0 (130 when
a second signal cut the requests short).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import RKLLMError
from ..models.budget import AUTO
from ..models.manager import LoadEvent, ModelManager
from ..models.registry import ModelRegistry
from .wire_images import body_limit_for

if TYPE_CHECKING:
    import uvicorn

    from .deps import ServerState

__all__ = ["ENV_API_KEY", "add_arguments", "serve"]

#: Environment variable holding the API key (``--api-key`` wins).
ENV_API_KEY = "RKLLM_API_KEY"

_GRACE = 5.0
"""Seconds uvicorn waits past ``--shutdown-timeout`` for aborted streams to send their end."""


def _port(text: str) -> int:
    """A TCP port number (0-65535), for argparse."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rkllm serve`` / ``python -m rkllm_core.serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0: any free port)")
    parser.add_argument("--model-dir", action="append", help="a model directory (repeatable; default RKLLM_MODEL_DIR)")
    parser.add_argument("--lib", help="runtime library path (default: RKLLM_LIB_PATH, then the usual places)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${ENV_API_KEY}, else none)")
    parser.add_argument(
        "--max-loaded",
        type=int,
        help="models loaded at once (default: RKLLM_MAX_LOADED, else as many as fit in the memory available)",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        help="estimated MB the loaded models may use (default: RKLLM_MEMORY_BUDGET_MB, else the memory available)",
    )
    parser.add_argument(
        "--keep-alive",
        type=_duration,
        metavar="DURATION",
        help="unload a model unused this long (e.g. 300, 5m, 1h; -1: never, the default); "
        "an Ollama request's keep_alive overrides it for its model",
    )
    parser.add_argument(
        "--n-batch",
        type=_n_batch,
        metavar="N",
        help="experimental: serve up to N concurrent requests per chat model in one batched run "
        "(models with their own n_batch in rkllm-models.toml keep it; default: off)",
    )
    parser.add_argument("--board", help="name reported in X-RKLLM-Board (default: the host name)")
    parser.add_argument("--max-waiting", type=int, default=64, help="requests in line before 429 (default 64)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="largest max_tokens accepted (default 8192)")
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODEL",
        help="load MODEL before serving (repeatable; an unknown name fails the start)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take after SIGTERM / Ctrl-C before they are aborted (default 30)",
    )
    _add_image_arguments(parser)
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="do not log a line per request"
    )


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """``--allow-remote-images`` and ``--max-image-mb``."""
    parser.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs that requests send (size and time limited); off by default: "
        "requests send images as base64",
    )
    parser.add_argument(
        "--max-image-mb",
        type=_image_mb,
        default=16.0,
        help="largest image a request may send, decoded (default 16); the body limit grows with it",
    )


def _image_mb(text: str) -> float:
    """``--max-image-mb``: a positive number of megabytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _n_batch(text: str) -> int:
    """``--n-batch``: the runtime's range, 1 (off) to 100."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 1 (off) and 100, got {value}")
    return value


def _duration(text: str) -> float:
    """``--keep-alive``: seconds, or a duration such as ``5m`` (Ollama's spelling); negative for never."""
    from .ollama_wire import keep_alive_seconds
    from .wire import WireError

    try:
        value = keep_alive_seconds(text)
    except WireError as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (seconds, or e.g. 5m, 1h30m)") from exc
    assert value is not None
    return value


def _announce(manager: ModelManager, args: argparse.Namespace, api_key: str | None) -> None:
    """One line: where the server listens, which runtime, which models, whether a key is needed."""
    lib = manager.library
    models = manager.registry.models()
    print(
        f"rkllm serve: http://{args.host}:{args.port}/v1 — runtime {lib.path} (ABI {lib.abi}"
        f"{', SIMULATOR' if lib.is_simulator else ''}); {len(models)} model(s): "
        + ", ".join(f"{m.name} ({m.kind})" for m in models)
        + ("; API key required" if api_key else "; no API key"),
        flush=True,
    )
    keep = manager.default_keep_alive
    print(
        f"rkllm serve: keeps {manager.budget.describe()}"
        + (f"; unloads a model unused for {keep:g} s" if keep is not None and keep >= 0 else ""),
        flush=True,
    )
    if manager.n_batch:
        print(
            f"rkllm serve: batched decoding (experimental): up to {manager.n_batch} requests per chat model "
            "share one run; each batched turn prefills its whole conversation",
            flush=True,
        )
    manager.on_load(_show_load)


def _show_load(event: LoadEvent) -> None:
    """A line in the server's log when a model starts and ends loading (seconds of silence otherwise)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if event.phase == "start":
        print(f"{stamp} loading {event.name} ({event.size_mb:.0f} MB)…", file=sys.stderr, flush=True)
    elif event.phase == "done":
        print(f"{stamp} loaded {event.name} in {event.seconds:.1f} s", file=sys.stderr, flush=True)
    else:
        print(f"{stamp} loading {event.name} failed: {event.error}", file=sys.stderr, flush=True)


def _manager(args: argparse.Namespace) -> ModelManager:
    """The server's model manager, as the command line configures it."""
    return ModelManager(
        ModelRegistry(args.model_dir or None),
        library=args.lib,
        max_loaded=AUTO if args.max_loaded is None else args.max_loaded,
        memory_budget_mb=AUTO if args.memory_budget_mb is None else args.memory_budget_mb,
        keep_alive=args.keep_alive,
        n_batch=getattr(args, "n_batch", None),
    )


def serve(args: argparse.Namespace) -> int:
    """Start the server and block until it is stopped (Ctrl-C / SIGTERM: finish or abort, then close)."""
    try:
        import uvicorn
    except ImportError:
        print('rkllm serve needs the server extra: pip install -e ".[server]" in a checkout', file=sys.stderr)
        return 2
    from .app import ServerSettings, create_app

    if args.shutdown_timeout < 0:
        print("rkllm serve: --shutdown-timeout must be 0 or more", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(ENV_API_KEY) or None
    try:
        manager = _manager(args)
    except RKLLMError as exc:  # a bad --max-loaded or RKLLM_MAX_LOADED
        print(f"rkllm serve: {exc}", file=sys.stderr, flush=True)
        return 2
    settings = ServerSettings(
        api_key=api_key,
        board=args.board or "",
        max_waiting=args.max_waiting,
        max_tokens=args.max_tokens,
        access_log=args.access_log,
        max_image_bytes=int(args.max_image_mb * 1024 * 1024),
        allow_remote_images=args.allow_remote_images,
        max_body_bytes=body_limit_for(int(args.max_image_mb * 1024 * 1024)),
    )
    status = 0
    try:
        app = create_app(manager, settings)
        _announce(manager, args, api_key)
        if _preload(manager, args.preload):
            status = _run(
                uvicorn.Config(
                    app,
                    host=args.host,
                    port=args.port,
                    log_level="warning",
                    lifespan="off",
                    access_log=False,  # the app logs each request itself, with model and tokens
                    timeout_graceful_shutdown=round(args.shutdown_timeout + _GRACE),
                ),
                app.state.rkllm,
                args,
            )
        else:
            status = 130  # a signal while preloading: stop before serving
    except RKLLMError as exc:  # a bad --preload, a missing runtime
        print(f"rkllm serve: {exc}", file=sys.stderr, flush=True)
        status = 2
    except KeyboardInterrupt:  # Ctrl-C before the server took the signals over
        status = 130
    finally:
        manager.close()  # every handle, after in-flight requests were finished or aborted
    print("rkllm serve: stopped", flush=True)
    return status


def _run(config: uvicorn.Config, state: ServerState, args: argparse.Namespace) -> int:
    """Serve until stopped; the exit status."""
    from .lifecycle import Server

    if args.access_log:
        _log_access()
    server = Server(config, state, args.shutdown_timeout)
    server.run()
    return server.exit_status


def _preload(manager: ModelManager, names: list[str]) -> bool:
    """Load ``names`` in the line like any request; False when SIGTERM or Ctrl-C asked to stop meanwhile.

    A signal does not interrupt a load (an exception thrown into the manager mid-load could lose
    the handle it just made): the load in progress finishes, the rest are skipped.
    """
    stop: list[int] = []

    def note(sig: int, frame: FrameType | None) -> None:
        stop.append(sig)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in names:
            if stop:
                break
            print(f"rkllm serve: loading {name}", flush=True)
            with manager.lease(name):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return not stop


def _log_access() -> None:
    from .deps import ACCESS_LOGGER

    log = logging.getLogger(ACCESS_LOGGER)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
