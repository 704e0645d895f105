#!/usr/bin/env bash
# Create .venv at the repository root and install spine-wff with everything it needs.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "creating $ROOT/.venv" >&2
    "$PY" -m venv "$ROOT/.venv"
fi
STAMP="$ROOT/.venv/.wff-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "installing spine-wff and its dependencies into .venv (first time: about 1-2 minutes)" >&2
    "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$ROOT/.venv/bin/python" -m pip install --quiet -e "$ROOT[dev]"
    touch "$STAMP"
fi
