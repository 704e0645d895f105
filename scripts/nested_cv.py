"""Nested cross-validation of the fusion choice on a run's out-of-fold components.

`wff train` keeps every training patient's out-of-fold components in cv_components.json. This
study asks whether a fusion option (here: choosing the voting threshold from
fusion.det_threshold_grid) generalises: for each fold k, the weights (and threshold) are chosen on
the other folds' components, exactly as `wff train` chooses them, and scored on fold k, which took
no part in the choice. The pooled held-out decisions give ACC, AUC, SE, SP per option.

    .venv/bin/python scripts/nested_cv.py runs/demo/artifacts [--json FILE]
    .venv/bin/python scripts/nested_cv.py runs/demo/artifacts --prevalence 0.357 [--vote-grid 0.4,0.5,0.6]

With ``--prevalence P`` it compares the operating point instead: the default (balanced accuracy,
vote threshold 0.5) against ``fusion.cv_metric = expected_acc`` at P, with the vote threshold 0.5
and chosen from the grid; every option is also scored by the accuracy it would have where a
fraction P of the patients is malignant, P x SE + (1 - P) x SP of the held-out decisions.

Reads no images and trains nothing: about a minute of CPU for 120 patients (3 minutes of wall time
beside a training run on 2 cores); 9 minutes for 445 patients with --prevalence and the 8-value vote
grid (2-core AMD EPYC VM, 2026-12-06).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from wff.config import FusionConfig, get_profile, load_profile
from wff.ensemble.metrics import binary_metrics
from wff.training.cv import expected_acc, nested_choice
from wff.training.train import CV_COMPONENTS, read_cv_components


def study_options(fusion: FusionConfig, prevalence: float | None, vote_grid: tuple[float, ...]) -> dict[str, FusionConfig]:
    grid = fusion.det_threshold_grid or FusionConfig().det_threshold_grid  # runs trained with the grid off
    if prevalence is None:
        return {
            f"fixed det_threshold {fusion.det_threshold:g}": dataclasses.replace(fusion, det_threshold_grid=()),
            f"threshold chosen from {list(grid)}": dataclasses.replace(fusion, det_threshold_grid=grid),
        }
    base = dataclasses.replace(fusion, det_threshold_grid=grid)
    return {
        "balanced_acc, vote threshold 0.5": dataclasses.replace(base, cv_metric="balanced_acc", vote_threshold_grid=(0.5,)),
        f"expected_acc at {prevalence:g}, vote threshold 0.5": dataclasses.replace(
            base, cv_metric="expected_acc", prevalence=prevalence, vote_threshold_grid=(0.5,)),
        f"expected_acc at {prevalence:g}, vote threshold from {list(vote_grid)}": dataclasses.replace(
            base, cv_metric="expected_acc", prevalence=prevalence, vote_threshold_grid=vote_grid),
    }


def nested(artifacts: Path, profile_name: str, prevalence: float | None = None, vote_grid: tuple[float, ...] = ()) -> dict:
    # profile.json is written when training ends; cv_components.json before the final fits
    saved = artifacts / "profile.json"
    profile = load_profile(saved) if saved.is_file() else get_profile(profile_name)
    comps, labels, folds = read_cv_components(artifacts / CV_COMPONENTS)
    fusion = profile.fusion
    options = study_options(fusion, prevalence, vote_grid)
    result: dict = {"artifacts": str(artifacts), "patients": len(labels), "strategy": fusion.strategy,
                    "prevalence": prevalence, "options": {}}
    for name, cfg in options.items():
        pred, score, chosen = nested_choice(comps, labels, folds, cfg)
        m = binary_metrics(labels, pred, score)
        held = {k: m[k] for k in ("acc", "auc", "se", "sp")}
        line = f"{name}: ACC {m['acc']:.3f} AUC {m['auc']:.3f} SE {m['se']:.3f} SP {m['sp']:.3f}"
        if prevalence is not None:
            held["expected_acc"] = expected_acc(m["se"], m["sp"], prevalence)
            line += f"; expected ACC at {prevalence:g}: {held['expected_acc']:.3f}"
        result["options"][name] = {"held_out": held, "per_fold": chosen}
        print(line, file=sys.stderr)
        for c in chosen:
            print(f"    fold {c['fold']}: weights {c['weights']}, threshold {c['det_threshold']:g}, "
                  f"vote threshold {c['vote_threshold']:g}", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path, help="a run's artifacts folder (with cv_components.json and profile.json)")
    ap.add_argument("--profile", default="small", help="profile to use while profile.json is not yet written (default small)")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--prevalence", type=float, help="compare operating points for this malignant fraction instead")
    ap.add_argument("--vote-grid", default="0.4,0.45,0.5,0.55,0.6,0.65,0.7",
                    help="vote thresholds for --prevalence, comma-separated (default %(default)s)")
    args = ap.parse_args()
    if not (args.artifacts / CV_COMPONENTS).is_file():
        sys.exit(f"{args.artifacts / CV_COMPONENTS}: not found; a run without it cannot be cross-validated again (retrain with wff train)")
    try:
        vote_grid = tuple(float(v) for v in args.vote_grid.split(","))
    except ValueError:
        sys.exit(f"--vote-grid {args.vote_grid!r}: expected numbers separated by commas, e.g. 0.4,0.5,0.6")
    result = nested(args.artifacts, args.profile, args.prevalence, vote_grid)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
