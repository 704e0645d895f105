"""Fusion (Eq. 1) and the two majority votes, on hand-checked cases."""

import json
import math

import numpy as np
import pytest

from wff.ensemble.fusion import (
    STRATEGIES,
    Components,
    FusionSettings,
    best_boxes,
    fuse,
    load_fusion_settings,
    series_image_p,
    settings_from_parameters,
    vote,
    vote_labels,
    weight_grid,
)

NAN = float("nan")


def components(d, score, series, m, a=NAN):
    return Components(
        np.array(d, np.float32), np.array(score, np.float32), np.array(series, np.int32), np.array(m, np.float32), a
    )


class TestBestBoxes:
    def test_picks_highest_valid_score(self):
        """The best box is the highest score among the first `count` detections."""
        boxes = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
        scores = np.array([[0.2, 0.9, 0.99], [0.7, 0.1, 0.0]], np.float32)  # 0.99 is padding (count 2)
        malig = np.array([[0.1, 0.8, 0.3], [0.6, 0.2, 0.0]], np.float32)
        d, s, b = best_boxes(boxes, scores, malig, np.array([[2], [1]]))
        np.testing.assert_allclose(d, [0.8, 0.6])
        np.testing.assert_allclose(s, [0.9, 0.7])
        np.testing.assert_array_equal(b[0], boxes[0, 1])

    def test_no_box_gives_nan_d_and_zero_score(self):
        """A slice without detections has D = NaN, score 0 and a zero box."""
        d, s, b = best_boxes(np.ones((1, 2, 4), np.float32), np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), np.array([0]))
        assert math.isnan(d[0]) and s[0] == 0 and not b.any()


class TestSeriesImageP:
    def test_eq1_normalised_by_present_weights(self):
        """P = (l1 D + l2 M + l3 A) / (l1 + l2 + l3) for each voting image."""
        p = series_image_p(np.array([0.8, 0.2]), np.array([0.9, 0.9]), 0.6, 0.3, (0.45, 0.45, 0.1), 0.5)
        np.testing.assert_allclose(p, [(0.45 * 0.8 + 0.45 * 0.6 + 0.1 * 0.3) / 1.0, (0.45 * 0.2 + 0.27 + 0.03) / 1.0], rtol=1e-6)

    def test_det_age_weights_need_not_sum_to_one(self):
        """Det-Age 0.45/0/0.1 (sum 0.55) gives a probability, not a value capped at 0.55."""
        p = series_image_p(np.array([1.0]), np.array([0.9]), 0.0, 1.0, (0.45, 0.0, 0.1), 0.5)
        np.testing.assert_allclose(p, [1.0])

    def test_low_scores_fall_back_on_best_slice(self):
        """With no slice above threshold, only the best-scoring box votes."""
        p = series_image_p(np.array([0.9, 0.1]), np.array([0.3, 0.4]), NAN, NAN, (1, 0, 0), 0.5)
        np.testing.assert_allclose(p, [0.1])

    def test_missing_age_drops_out(self):
        """A NaN age removes the age term instead of counting it as 0."""
        p = series_image_p(np.array([0.6]), np.array([0.9]), 0.6, NAN, (0.45, 0.45, 0.1), 0.5)
        np.testing.assert_allclose(p, [0.6], rtol=1e-6)

    def test_no_term_present_abstains(self):
        """Det-only on a series without any box abstains (empty)."""
        p = series_image_p(np.array([NAN, NAN]), np.array([0.0, 0.0]), 0.7, 0.5, (1, 0, 0), 0.5)
        assert p.size == 0


class TestFuse:
    def test_image_majority_then_series_majority(self):
        """Two of three images malignant -> series malignant; two of three series -> patient."""
        c = components(
            d=[0.9, 0.8, 0.1, 0.9, 0.7, 0.6, 0.2, 0.1, 0.3],
            score=[0.9] * 9,
            series=[0, 0, 0, 1, 1, 1, 2, 2, 2],
            m=[NAN, NAN, NAN],
        )
        dec = fuse(c, (1, 0, 0), 0.5)
        np.testing.assert_array_equal(dec.series_votes, [1, 1, 0])
        assert dec.label == 1
        np.testing.assert_allclose(dec.p_malignant, np.mean([np.mean([0.9, 0.8, 0.1]), np.mean([0.9, 0.7, 0.6]), 0.2]), rtol=1e-6)

    def test_series_tie_uses_mean_p(self):
        """Equal image votes in a series: the series mean P decides (0.45 mean -> benign)."""
        c = components(d=[0.6, 0.3], score=[0.9, 0.9], series=[0, 0], m=[NAN])
        dec = fuse(c, (1, 0, 0), 0.5)
        assert dec.series_votes[0] == 0 and dec.label == 0

    def test_patient_tie_uses_mean_p(self):
        """One malignant and one benign series: mean P 0.525 -> malignant."""
        c = components(d=[0.9, 0.15], score=[0.9, 0.9], series=[0, 1], m=[NAN, NAN])
        dec = fuse(c, (1, 0, 0), 0.5)
        np.testing.assert_array_equal(dec.series_votes, [1, 0])
        assert dec.label == 1 and dec.p_malignant == pytest.approx(0.525)

    def test_exact_half_votes_malignant(self):
        """An image with P exactly 0.5 votes malignant."""
        dec = fuse(components(d=[0.5], score=[0.9], series=[0], m=[NAN]), (1, 0, 0), 0.5)
        assert dec.label == 1

    def test_seq_strategy_ignores_detector_probabilities(self):
        """Seq uses M only: every image of a series has P = M."""
        c = components(d=[0.99, 0.99], score=[0.9, 0.9], series=[0, 1], m=[0.2, 0.3])
        dec = fuse(c, (0, 1, 0), 0.5)
        assert dec.label == 0 and dec.p_malignant == pytest.approx(0.25)

    def test_all_series_abstain(self):
        """No usable term anywhere -> P = 0.5, malignant (the positive class)."""
        dec = fuse(components(d=[NAN], score=[0.0], series=[0], m=[NAN]), (1, 0, 0), 0.5)
        assert dec.label == 1 and dec.p_malignant == 0.5 and dec.series_votes[0] == -1

    def test_rejects_negative_weights(self):
        """Negative or all-zero weights are refused."""
        with pytest.raises(ValueError, match="weights"):
            fuse(components(d=[0.5], score=[0.9], series=[0], m=[0.5]), (1, -1, 0), 0.5)


class TestWeightGrid:
    def test_grid_on_simplex_with_active_terms_only(self):
        """Det-Seq-Age at step 0.25: three positive weights summing to 1."""
        grid = weight_grid(STRATEGIES["Det-Seq-Age"], 0.25)
        assert (0.5, 0.25, 0.25) in grid and len(grid) == 3
        assert all(abs(sum(w) - 1) < 1e-9 and min(w) > 0 for w in grid)

    def test_single_term_strategy_has_one_point(self):
        """Det alone has the single weight vector (1, 0, 0)."""
        assert weight_grid(STRATEGIES["Det"], 0.05) == [(1.0, 0.0, 0.0)]


class TestFusionSettings:
    def test_round_trip(self, tmp_path):
        """fusion.json written and read back is the same."""
        s = FusionSettings(cv={"folds": 4})
        s.save(tmp_path / "fusion.json")
        assert load_fusion_settings(tmp_path / "fusion.json") == s

    def test_unknown_strategy_named(self, tmp_path):
        """A served strategy that is not defined is an error naming the file."""
        (tmp_path / "f.json").write_text('{"served_strategy": "X", "det_threshold": 0.5, "strategies": {"Det": [1,0,0]}}')
        with pytest.raises(ValueError, match="f.json"):
            load_fusion_settings(tmp_path / "f.json")

    @pytest.mark.parametrize("calibration", ["absent", None, {"d": [1.0, 0.0], "m": [1.0, 0.0]}, {"d": [1, 0], "m": [1, 0]}])
    def test_uncalibrated_runs_load_as_before(self, tmp_path, calibration):
        """fusion.json of runs that left D and M uncalibrated (no key, null, or the identity that every
        run wrote while the option existed) loads, and is written back without the key."""
        data = FusionSettings(cv={"folds": 4}).to_dict()
        assert "calibration" not in data
        if calibration != "absent":
            data["calibration"] = calibration
        (tmp_path / "fusion.json").write_text(json.dumps(data))
        loaded = load_fusion_settings(tmp_path / "fusion.json")
        assert loaded == FusionSettings(cv={"folds": 4})
        params = {k: v if k == "served_strategy" else json.dumps(v) for k, v in data.items()}  # a built repository's
        assert settings_from_parameters(params) == loaded

    def test_calibrated_run_is_refused(self, tmp_path):
        """A fusion.json that calibrates D or M (Platt scaling, removed) is refused naming the file, the
        key and the refit that chooses the fusion again without it; so is a repository built from one."""
        data = {**FusionSettings().to_dict(), "calibration": {"d": [0.5, 0.1], "m": [1.0, 0.0]}}
        (tmp_path / "fusion.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"fusion\.json: \"calibration\".*no gain measured.*wff dev refit-fusion ARTIFACTS"):
            load_fusion_settings(tmp_path / "fusion.json")
        params = {k: v if k == "served_strategy" else json.dumps(v) for k, v in data.items()}
        with pytest.raises(ValueError, match=r"fusion model config parameters: \"calibration\".*wff repo build"):
            settings_from_parameters(params)

    def test_decide_is_eq1_on_the_components_as_they_are(self):
        """D = 0.95 and age 0.2 at equal weights: P = 0.575, malignant at vote threshold 0.5, benign at 0.6."""
        c = components([0.95], [0.9], [0], [0.5], a=0.2)
        settings = FusionSettings("Det-Age", 0.5, {"Det-Age": (0.5, 0.0, 0.5)}, vote_thresholds={"Det-Age": 0.6})
        assert settings.decide(c).p_malignant == pytest.approx(0.575)
        assert settings.decide(c).label == 0 and fuse(c, (0.5, 0.0, 0.5), 0.5).label == 1


class TestVoteLabels:
    def test_matches_vote_at_every_threshold(self):
        """The search's vectorised votes equal the served rule, ties and abstaining series included."""
        rng = np.random.default_rng(0)
        thresholds = np.array([0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7])
        cases = [[], [np.array([], np.float32)], [np.array([0.5, 0.5], np.float32)],
                 [np.array([0.4, 0.6], np.float32), np.array([0.55], np.float32)]]
        for _ in range(300):
            cases.append([rng.choice([0.3, 0.45, 0.5, 0.55, 0.6, 0.7], size=rng.integers(0, 5)).astype(np.float32)
                          if rng.random() < 0.5 else rng.random(rng.integers(0, 5)).astype(np.float32)
                          for _ in range(rng.integers(1, 5))])
        for images in cases:
            labels, score = vote_labels(images, thresholds)
            for t, label in zip(thresholds, labels):
                expected = vote(images, float(t))
                assert (label, score) == (expected.label, expected.p_malignant), (images, t)
