#!/usr/bin/env bash
# Run the quickstart: on the NPU when librkllmrt.so is found, otherwise on the bundled simulator
# (with the demo models of `rkllm demo`). It ends by printing what to run next: activate the
# virtualenv (`source .venv/bin/activate`) to get the `rkllm` command.
. "$(dirname "$0")/_venv.sh" all
exec "$VENV/bin/python" examples/quickstart.py "$@"
