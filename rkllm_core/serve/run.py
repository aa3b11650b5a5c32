"""Run the server: command-line arguments, start-up report, uvicorn, graceful shutdown."""

from __future__ import annotations

import argparse
import os
import sys

from ..models.manager import ModelManager
from ..models.registry import ModelRegistry

__all__ = ["ENV_API_KEY", "add_arguments", "serve"]

#: Environment variable holding the API key (``--api-key`` wins).
ENV_API_KEY = "RKLLM_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rkllm serve`` / ``python -m rkllm_core.serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--model-dir", action="append", help="a model directory (repeatable; default RKLLM_MODEL_DIR)")
    parser.add_argument("--lib", help="runtime library path (default: RKLLM_LIB_PATH, then the usual places)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${ENV_API_KEY}, else none)")
    parser.add_argument("--max-loaded", type=int, default=2, help="models loaded at once (default 2)")
    parser.add_argument("--memory-budget-mb", type=float, help="estimated memory the loaded models may use")
    parser.add_argument("--board", help="name reported in X-RKLLM-Board (default: the host name)")
    parser.add_argument("--max-waiting", type=int, default=64, help="requests in line before 429 (default 64)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="largest max_tokens accepted (default 8192)")


def serve(args: argparse.Namespace) -> int:
    """Start the server and block until it is stopped (Ctrl-C / SIGTERM: finish or abort, then close)."""
    try:
        import uvicorn
    except ImportError:
        print('rkllm serve needs the server extra: pip install "boardllm[server]"', file=sys.stderr)
        return 2
    from .app import ServerSettings, create_app

    api_key = args.api_key or os.environ.get(ENV_API_KEY) or None
    manager = ModelManager(
        ModelRegistry(args.model_dir or None),
        library=args.lib,
        max_loaded=args.max_loaded,
        memory_budget_mb=args.memory_budget_mb,
    )
    settings = ServerSettings(
        api_key=api_key, board=args.board or "", max_waiting=args.max_waiting, max_tokens=args.max_tokens
    )
    try:
        app = create_app(manager, settings)
        lib = manager.library
        models = manager.registry.models()
        print(
            f"rkllm serve: http://{args.host}:{args.port}/v1 — runtime {lib.path} (ABI {lib.abi}"
            f"{', SIMULATOR' if lib.is_simulator else ''}); {len(models)} model(s): "
            + ", ".join(f"{m.name} ({m.kind})" for m in models)
            + ("; API key required" if api_key else "; no API key"),
            flush=True,
        )
        uvicorn.run(
            app, host=args.host, port=args.port, log_level="warning", lifespan="off", timeout_graceful_shutdown=30
        )
    except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down
        pass
    finally:
        manager.close()  # every handle, after in-flight requests were finished or aborted
    print("rkllm serve: stopped", flush=True)
    return 0
