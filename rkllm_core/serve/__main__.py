"""``python -m rkllm_core.serve``: the same as ``rkllm serve``."""

import argparse

from .run import add_arguments, serve

parser = argparse.ArgumentParser(prog="python -m rkllm_core.serve", description="OpenAI- and Ollama-compatible server")
add_arguments(parser)
raise SystemExit(serve(parser.parse_args()))
