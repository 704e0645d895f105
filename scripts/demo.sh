#!/usr/bin/env bash
# The main job on the embedded CPU default: synthesize a dataset, train the small profile,
# build the embedded Triton repository, serve it with the real tritonserver, evaluate the
# test split over gRPC and print Table 3. Extra arguments go to `wff demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/wff" demo "$@"
