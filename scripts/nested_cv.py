"""Nested cross-validation of the fusion choice on a run's out-of-fold components.

`wff train` keeps every training patient's out-of-fold components in cv_components.json. This
study asks whether a fusion option (here: choosing the voting threshold from
fusion.det_threshold_grid, or calibrating D and M with fusion.calibrate) generalises: for each
fold k, the weights (and threshold, and calibration) are chosen on the other folds' components,
exactly as `wff train` chooses them, and scored on fold k, which took no part in the choice. The pooled held-out decisions give ACC, AUC, SE, SP per option.

    .venv/bin/python scripts/nested_cv.py runs/demo/artifacts [--json FILE]

Reads no images and trains nothing: about a minute of CPU for 120 patients (3 minutes of wall time
beside a training run on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from wff.config import FusionConfig, get_profile, load_profile
from wff.ensemble.metrics import binary_metrics
from wff.training.cv import nested_choice
from wff.training.train import CV_COMPONENTS, read_cv_components


def nested(artifacts: Path, profile_name: str) -> dict:
    # profile.json is written when training ends; cv_components.json before the final fits
    saved = artifacts / "profile.json"
    profile = load_profile(saved) if saved.is_file() else get_profile(profile_name)
    comps, labels, folds = read_cv_components(artifacts / CV_COMPONENTS)
    fusion = profile.fusion
    grid = fusion.det_threshold_grid or FusionConfig().det_threshold_grid  # runs trained with the grid off
    options = {
        f"fixed det_threshold {fusion.det_threshold:g}": dataclasses.replace(fusion, det_threshold_grid=(), calibrate=False),
        f"threshold chosen from {list(grid)}": dataclasses.replace(fusion, det_threshold_grid=grid, calibrate=False),
        f"threshold chosen from {list(grid)}, D and M calibrated": dataclasses.replace(fusion, det_threshold_grid=grid, calibrate=True),
    }
    result: dict = {"artifacts": str(artifacts), "patients": len(labels), "strategy": fusion.strategy, "options": {}}
    for name, cfg in options.items():
        pred, score, chosen = nested_choice(comps, labels, folds, cfg)
        m = binary_metrics(labels, pred, score)
        result["options"][name] = {"held_out": {k: m[k] for k in ("acc", "auc", "se", "sp")}, "per_fold": chosen}
        print(f"{name}: ACC {m['acc']:.3f} AUC {m['auc']:.3f} SE {m['se']:.3f} SP {m['sp']:.3f}", file=sys.stderr)
        for c in chosen:
            cal = c["calibration"]
            print(f"    fold {c['fold']}: weights {c['weights']}, threshold {c['det_threshold']:g}, "
                  f"calibration D a={cal['d'][0]:.2f} b={cal['d'][1]:.2f}, M a={cal['m'][0]:.2f} b={cal['m'][1]:.2f}", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path, help="a run's artifacts folder (with cv_components.json and profile.json)")
    ap.add_argument("--profile", default="small", help="profile to use while profile.json is not yet written (default small)")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    if not (args.artifacts / CV_COMPONENTS).is_file():
        sys.exit(f"{args.artifacts / CV_COMPONENTS}: not found; runs trained before 2026-12-02 lack it (retrain with wff train)")
    result = nested(args.artifacts, args.profile)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
