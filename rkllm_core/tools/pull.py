"""The ``rkllm pull`` and ``rkllm rm`` subcommands."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands to the ``rkllm`` parser."""
