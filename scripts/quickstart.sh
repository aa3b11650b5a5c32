#!/usr/bin/env bash
# Run the quickstart: on the NPU when librkllmrt.so is found, otherwise on the bundled simulator.
. "$(dirname "$0")/_venv.sh" all
exec "$VENV/bin/python" examples/quickstart.py "$@"
