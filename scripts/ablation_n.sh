#!/usr/bin/env bash
# The paper's clip-length ablation (N = 4, 8, 16 slices per sequence clip), from served predictions:
# `wff demo` trains the small profile with classifier.clip_len=N (cross-validated weights included),
# serves it with tritonserver and evaluates the test split over gRPC, for each N; then Table 3 of the
# three runs is written side by side as runs/ablation-n/ablation.{json,csv,png}.
# N only changes the sequence classifier, so N = 8 and N = 4 reuse the N = 16 run's fold and final
# detectors (`--detectors-from`, checked to match) and train only the classifiers: about a third of a
# whole demo each. Finished runs are reused (copy runs/demo to runs/ablation-n/n16 to reuse the demo's
# N = 16). Extra arguments go to every `wff demo` (e.g. --size demo for the smaller dataset).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$ROOT/.venv/bin/wff" demo --out runs/ablation-n/n16 --set classifier.clip_len=16 "$@"
for n in 8 4; do
    "$ROOT/.venv/bin/wff" demo --out "runs/ablation-n/n$n" --set "classifier.clip_len=$n" \
        --detectors-from runs/ablation-n/n16/artifacts "$@"
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
