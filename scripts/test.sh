#!/usr/bin/env bash
# Run the test suite (the simulator is compiled by a pytest fixture with the system C compiler).
. "$(dirname "$0")/_venv.sh" dev
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
