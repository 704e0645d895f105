#!/usr/bin/env bash
# The first command: set up the virtualenv, then `wff demo`: synthesize the demo dataset (120
# training / 60 test patients), train the small profile, build the embedded Triton repository,
# serve it with the real tritonserver, evaluate the test split over gRPC, write the report and
# the overlays, and print where they are and what to try next.
# Extra arguments go to `wff demo`, e.g. `bash scripts/demo.sh --size paper` for the paper-size set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/wff" demo "$@"
