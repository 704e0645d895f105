#!/usr/bin/env bash
# Does a reduced-precision runtime change the diagnoses? Serves a trained run twice with
# tritonserver, serving.runtime_precision=f32 and =bf16 (OpenVINO), evaluates the test split
# over gRPC each time and compares them patient by patient: decisions changed and the largest
# change of the patient score per strategy, and both Table 3s. Writes runs/precision/.
# Usage: bash scripts/precision_check.sh [ARTIFACTS [DATASET]]   (default runs/demo/artifacts data/paper)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
ARTIFACTS="${1:-runs/demo/artifacts}" DATASET="${2:-data/paper}" exec "$ROOT/.venv/bin/python" - <<'PY'
import json
import os
from pathlib import Path

from wff.client.evaluate import compare_evaluations, evaluate
from wff.config import load_profile
from wff.ensemble.metrics import format_table
from wff.serving.cli import serving_overrides
from wff.serving.repository import build_repository
from wff.serving.server import TritonServer
from wff.training.dataset import load_records

artifacts, dataset, out = Path(os.environ["ARTIFACTS"]), Path(os.environ["DATASET"]), Path("runs/precision")
records = load_records(dataset, split="test")
profile = load_profile(artifacts / "profile.json")
runs = {}
for precision in ("f32", "bf16"):
    serving = serving_overrides(profile, ("serving.runtime=openvino", f"serving.runtime_precision={precision}"))
    repository = build_repository(out / f"repository-{precision}", "embedded", artifacts, overwrite=True, serving=serving)
    with TritonServer(repository) as server:
        runs[precision] = evaluate(records, url=server.grpc_url, concurrency=4)
    (out / f"{precision}.json").write_text(json.dumps(runs[precision].to_dict(), indent=2) + "\n")
    print(f"{precision}: {len(records)} patients, {runs[precision].errors} errors, "
          f"{runs[precision].seconds_per_patient:.3f} s/patient (concurrency 4)")
    print(format_table(runs[precision].table))
comparison = compare_evaluations(runs["f32"], runs["bf16"])
(out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
print("bf16 against f32, per strategy: decisions changed / patients, max |dP|")
for name, row in comparison["strategies"].items():
    print(f"  {name:<12} {row['decisions_changed']:>3} / {row['patients']}   {row['max_abs_dp']}")
print(f"written: {out}/f32.json, bf16.json, comparison.json")
PY
