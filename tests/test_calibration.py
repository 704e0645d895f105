"""Platt calibration of D and M (ensemble.calibration): fits, weights and the identity."""

import numpy as np
import pytest

from wff.ensemble.calibration import Calibration, Platt, apply_calibration, balanced_weights, logit
from wff.ensemble.fusion import Components
from wff.training.cv import fit_calibration

NAN = float("nan")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class TestPlatt:
    def test_identity_maps_p_to_itself_and_keeps_nan(self):
        p = np.array([0.01, 0.3, 0.5, 0.97, NAN])
        out = Platt()(p)
        assert np.allclose(out[:4], p[:4], atol=1e-6)
        assert np.isnan(out[4])

    def test_recovers_a_known_temperature(self):
        """Outputs that are over-confident by a factor 4 in logit come back with a ~ 1/4, b ~ 0."""
        rng = np.random.default_rng(0)
        x = rng.normal(0, 1.5, 40000)  # true logit
        y = (rng.random(x.size) < sigmoid(x)).astype(int)
        fitted = Platt.fit(sigmoid(4 * x), y, np.ones(x.size))
        assert fitted.a == pytest.approx(0.25, abs=0.02)
        assert fitted.b == pytest.approx(0.0, abs=0.05)

    def test_recovers_a_shift(self):
        rng = np.random.default_rng(1)
        x = rng.normal(0, 1.0, 40000)
        y = (rng.random(x.size) < sigmoid(x - 1.0)).astype(int)
        fitted = Platt.fit(sigmoid(x), y, np.ones(x.size))
        assert fitted.a == pytest.approx(1.0, abs=0.05)
        assert fitted.b == pytest.approx(-1.0, abs=0.05)

    def test_separable_data_stays_finite(self):
        p = np.array([0.1, 0.2, 0.8, 0.9])
        fitted = Platt.fit(p, np.array([0, 0, 1, 1]), np.ones(4))
        assert np.isfinite(fitted.a) and np.isfinite(fitted.b) and fitted.a > 1

    def test_one_class_gives_identity(self):
        assert Platt.fit(np.array([0.2, 0.7]), np.array([1, 1]), np.ones(2)) == Platt()

    def test_shape_mismatch_is_named(self):
        with pytest.raises(ValueError, match="one entry each"):
            Platt.fit(np.array([0.2, 0.7]), np.array([1]), np.ones(2))

    def test_monotone(self):
        """Calibration never reorders outputs (a > 0 on informative data), so AUC of one term is kept."""
        rng = np.random.default_rng(2)
        x = rng.normal(0, 1, 2000)
        y = (rng.random(x.size) < sigmoid(2 * x)).astype(int)
        fitted = Platt.fit(sigmoid(x), y, np.ones(x.size))
        grid = np.linspace(0.01, 0.99, 50)
        assert fitted.a > 0 and np.all(np.diff(fitted(grid)) > 0)


class TestBalancedWeights:
    def test_classes_weigh_half_each(self):
        labels = np.array([1, 1, 1, 0])
        w = balanced_weights(labels, np.ones(4))
        assert w[labels == 1].sum() == pytest.approx(0.5) and w[labels == 0].sum() == pytest.approx(0.5)

    def test_patient_share_kept_within_class(self):
        labels = np.array([1, 1, 1])
        w = balanced_weights(labels, np.array([0.5, 0.5, 1.0]))  # patient A: two slices, patient B: one
        assert w[:2].sum() == pytest.approx(w[2])


def patient(d, score, series, m, a=NAN):
    return Components(np.array(d, np.float32), np.array(score, np.float32), np.array(series, np.int32), np.array(m, np.float32), a)


class TestFitCalibration:
    def test_equal_prior_rates_per_value(self):
        """Two values of M, each class weighing half: the fit returns the class-balanced rate of
        malignancy at each value (0.8 and 0.2 here), not the training mix's (30 malignant : 10 benign)."""
        def series(m):
            return patient([0.9], [0.9], [0], [m])

        comps = [series(0.9)] * 24 + [series(0.5)] * 6 + [series(0.5)] * 8 + [series(0.9)] * 2
        labels = [1] * 30 + [0] * 10
        cal = fit_calibration(comps, labels, det_threshold=0.5)
        assert cal.m(np.array([0.9, 0.5])) == pytest.approx([0.8, 0.2], abs=5e-3)  # the ridge moves it slightly

    def test_only_voting_slices_fit_d(self):
        """Slices below the voting threshold (and boxless ones) do not enter D's fit."""
        rng = np.random.default_rng(3)
        comps, labels = [], []
        for i in range(200):
            y = i % 2
            good = 0.8 if y else 0.2  # voting slices: informative
            noise = 0.99 if y == 0 else 0.01  # low-score slices: misleading, must be ignored
            comps.append(patient([good, noise, NAN], [0.9, 0.05, 0.0], [0, 0, 0], [0.5]))
            labels.append(y)
        cal = fit_calibration(comps, labels, det_threshold=0.5)
        assert cal.d(np.array([0.8]))[0] > 0.9  # 0.8 was always right: pushed towards 1
        del rng

    def test_apply_changes_d_and_m_only(self):
        c = patient([0.9, NAN], [0.8, 0.0], [0, 0], [0.7], a=0.3)
        cal = Calibration(Platt(0.5, 0.0), Platt(2.0, 0.0))
        out = apply_calibration(c, cal)
        assert out.slice_d[0] == pytest.approx(sigmoid(0.5 * logit(np.array([0.9]))[0]), rel=1e-5)
        assert np.isnan(out.slice_d[1])
        assert out.series_m[0] == pytest.approx(sigmoid(2 * logit(np.array([0.7]))[0]), rel=1e-5)
        assert out.age_a == 0.3 and np.array_equal(out.slice_score, c.slice_score)

    def test_identity_returns_same_object(self):
        c = patient([0.9], [0.8], [0], [0.7])
        assert apply_calibration(c, Calibration()) is c

    def test_round_trip_and_malformed(self):
        cal = Calibration(Platt(0.5, -0.25), Platt(1.5, 0.125))
        assert Calibration.from_dict(cal.to_dict()) == cal
        assert Calibration.from_dict(None) == Calibration()
        with pytest.raises(ValueError, match="malformed calibration"):
            Calibration.from_dict({"d": [1.0]})
