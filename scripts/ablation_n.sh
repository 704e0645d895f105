#!/usr/bin/env bash
# The paper's clip-length ablation (N = 4, 8, 16 slices per sequence clip), from served predictions:
# for each N, `wff demo` trains the small profile on the demo dataset with classifier.clip_len=N
# (cross-validated weights included), serves it with tritonserver and evaluates the test split
# over gRPC; then Table 3 of the three runs is written side by side as
# runs/ablation-n/ablation.{json,csv,png}. Finished runs are reused (copy runs/demo to
# runs/ablation-n/n16 to reuse the demo's N = 16). About an hour per N on the 2-core development VM
# with the current small defaults. Extra arguments go to every `wff demo` (e.g. --size paper --data data/paper).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
for n in 4 8 16; do
    "$ROOT/.venv/bin/wff" demo --out "runs/ablation-n/n$n" --set "classifier.clip_len=$n" "$@"
done
"$ROOT/.venv/bin/python" - <<'PY'
import json
from pathlib import Path

from wff.client.report import format_ablation, write_ablation

root = Path("runs/ablation-n")
rows = {f"N={n}": json.loads((root / f"n{n}" / "evaluation.json").read_text()) for n in (4, 8, 16)}
files = write_ablation(rows, root, title="Clip length N of the sequence classifier (served, test split)")
print(format_ablation(rows))
print("written:", ", ".join(str(p) for p in files.values()))
PY
