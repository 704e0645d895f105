"""wff dev refit-fusion: the fusion chosen again from a run's out-of-fold components, nothing trained."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from wff.cli import main
from wff.config import SMALL, load_profile
from wff.ensemble.fusion import Components, load_fusion_settings
from wff.training.cv import choose_fusion
from wff.training.train import CV_COMPONENTS, refit_fusion, write_cv_components


def run_folder(tmp_path):
    """A trained run's folder as far as refit needs it: profile.json, cv_components.json, fusion.json,
    train_report.json. D is over-confident (0.99 / 0.01, right for 7 of 10 patients per class); age is informative."""
    comps, labels = [], []
    for y in (0, 1):
        for i in range(10):
            right = i < 7
            d = 0.99 if (y == 1) == right else 0.01
            comps.append(Components(np.array([d], np.float32), np.array([0.9], np.float32), np.array([0], np.int32),
                                    np.array([0.5], np.float32), 0.7 if y else 0.3))
            labels.append(y)
    labels = np.array(labels)
    folds = [np.flatnonzero(np.arange(20) % 2 == k) for k in (0, 1)]
    SMALL.save(tmp_path / "profile.json")
    write_cv_components(tmp_path / CV_COMPONENTS, comps, labels, folds)
    choose_fusion(comps, labels, SMALL.fusion).save(tmp_path / "fusion.json")
    (tmp_path / "train_report.json").write_text(json.dumps({"cv": {}, "onnx_parity": {}}))
    return tmp_path


def test_refit_rewrites_the_run(tmp_path):
    art = run_folder(tmp_path)
    settings = refit_fusion(art, {"det_threshold_grid": [0.1, 0.5]})
    saved = load_fusion_settings(art / "fusion.json")
    assert saved == settings and saved.det_threshold in (0.1, 0.5)
    assert load_profile(art / "profile.json").fusion.det_threshold_grid == (0.1, 0.5)
    report = json.loads((art / "train_report.json").read_text())
    assert report["cv"] == json.loads(json.dumps(settings.cv))
    assert report["fusion_refits"][0]["overrides"] == {"det_threshold_grid": [0.1, 0.5]}


def test_refit_chooses_a_calibrated_run_again_without_calibration(tmp_path):
    """A run whose fusion calibrated D and M (fusion.calibrate, removed) is refused where it is served,
    and wff dev refit-fusion ARTIFACTS, which that refusal names, makes it servable: fusion.json and
    profile.json rewritten without the removed keys, the same choice as an uncalibrated run's."""
    art = run_folder(tmp_path)
    uncalibrated = load_fusion_settings(art / "fusion.json")
    profile = json.loads((art / "profile.json").read_text())
    profile["fusion"]["calibrate"] = True
    (art / "profile.json").write_text(json.dumps(profile))
    fusion = json.loads((art / "fusion.json").read_text())
    fusion["calibration"] = {"d": [0.37, 0.02], "m": [1.4, -0.1]}
    (art / "fusion.json").write_text(json.dumps(fusion))
    with pytest.raises(ValueError, match=r"fusion\.json: \"calibration\".*wff dev refit-fusion ARTIFACTS"):
        load_fusion_settings(art / "fusion.json")
    result = CliRunner().invoke(main, ["dev", "refit-fusion", str(art)])
    assert result.exit_code == 0, result.output
    assert "calibration" not in json.loads((art / "fusion.json").read_text())
    assert "calibrate" not in json.loads((art / "profile.json").read_text())["fusion"]
    assert load_fusion_settings(art / "fusion.json").strategies == uncalibrated.strategies


def test_settings_the_components_depend_on_are_refused(tmp_path):
    art = run_folder(tmp_path)
    with pytest.raises(ValueError, match="det_threshold"):
        refit_fusion(art, {"det_threshold": 0.3})


def test_missing_components_named(tmp_path):
    SMALL.save(tmp_path / "profile.json")
    with pytest.raises(FileNotFoundError, match="cv_components.json"):
        refit_fusion(tmp_path, {"cv_metric": "acc"})


def test_cli(tmp_path):
    art = run_folder(tmp_path)
    result = CliRunner().invoke(main, ["dev", "refit-fusion", str(art), "--set", "fusion.det_threshold_grid=[0.1, 0.5]", "--json", "-"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["det_threshold"] in (0.1, 0.5) and "calibration" not in out
    assert load_profile(art / "profile.json").fusion.det_threshold_grid == (0.1, 0.5)
    bad = CliRunner().invoke(main, ["dev", "refit-fusion", str(art), "--set", "detector.epochs=2"])
    assert bad.exit_code == 2 and "fusion.* settings only" in bad.output
    removed = CliRunner().invoke(main, ["dev", "refit-fusion", str(art), "--set", "fusion.calibrate=true"])
    assert removed.exit_code == 2 and "fusion.calibrate (Platt calibration of D and M before Eq. 1) was removed" in removed.output


def test_cli_operating_point(tmp_path):
    """A prevalence and a vote-threshold grid go through --set, land in profile.json, and the
    chosen thresholds in fusion.json; a prevalence outside (0, 1) is refused naming the key."""
    art = run_folder(tmp_path)
    result = CliRunner().invoke(main, ["dev", "refit-fusion", str(art), "--set", "fusion.cv_metric=expected_acc",
                                       "--set", "fusion.prevalence=0.3", "--set", "fusion.vote_threshold_grid=[0.4, 0.5, 0.6]"])
    assert result.exit_code == 0, result.output
    fusion = load_profile(art / "profile.json").fusion
    assert (fusion.cv_metric, fusion.prevalence, fusion.vote_threshold_grid) == ("expected_acc", 0.3, (0.4, 0.5, 0.6))
    saved = load_fusion_settings(art / "fusion.json")
    assert set(saved.vote_thresholds) == set(saved.strategies) and set(saved.vote_thresholds.values()) <= {0.4, 0.5, 0.6}
    assert saved.cv["prevalence"] == 0.3
    bad = CliRunner().invoke(main, ["dev", "refit-fusion", str(art), "--set", "fusion.prevalence=1.5",
                                    "--set", "fusion.cv_metric=expected_acc"])
    assert bad.exit_code != 0 and "fusion.prevalence" in bad.output
