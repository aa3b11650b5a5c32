# Sourced by the scripts: create or reuse the project's virtualenv and install the project into it.
# Usage: . scripts/_venv.sh EXTRAS   (e.g. "all" or "dev")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.installed-$1"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "installing boardllm[$1] into $VENV (a minute or two the first time)" >&2
  if [ -t 1 ]; then quiet=(); else quiet=(-q); fi  # progress on a terminal, quiet in logs
  "$VENV/bin/python" -m pip install "${quiet[@]}" -e "$ROOT[$1]"
  touch "$stamp"
fi
cd "$ROOT"
