#!/usr/bin/env bash
# The test suite: unit tests of every pure step, ONNX export checks, and integration tests
# against a real tritonserver on a tiny trained model. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
