"""The age module: smoothed P(malignant | age group)."""

import math

import numpy as np
import pytest

from wff.config import AgePriorConfig
from wff.ensemble.age_prior import AgePrior

CFG = AgePriorConfig(edges=(0, 40, 80), alpha=2.0, max_age=120, balanced=False)
BALANCED = AgePriorConfig(edges=(0, 40, 80), alpha=2.0, max_age=120, balanced=True)


class TestAgePrior:
    def test_smoothed_group_rates(self):
        """A(g) = (malignant_g + alpha * overall) / (patients_g + alpha), by hand."""
        ages = np.array([10, 20, 30, 50, 60, 70, 85])
        labels = np.array([0, 0, 1, 1, 1, 0, 1])
        prior = AgePrior.fit(ages, labels, CFG)
        overall = 4 / 7
        assert prior.patients == (3, 3, 1)
        assert prior(25) == pytest.approx((1 + 2 * overall) / (3 + 2))
        assert prior(65) == pytest.approx((2 + 2 * overall) / (3 + 2))
        assert prior(90) == pytest.approx((1 + 2 * overall) / (1 + 2))

    def test_balanced_divides_out_the_class_mix(self):
        """Balanced: odds(A) = odds(smoothed rate) / odds(overall), i.e. equal class priors."""
        ages = np.array([10, 20, 30, 50, 60, 70, 85])
        labels = np.array([0, 0, 1, 1, 1, 0, 1])
        plain, balanced = AgePrior.fit(ages, labels, CFG), AgePrior.fit(ages, labels, BALANCED)
        overall = 4 / 7
        for age in (25, 65, 90):
            odds = plain(age) / (1 - plain(age)) / (overall / (1 - overall))
            assert balanced(age) == pytest.approx(odds / (1 + odds))
        assert balanced(25) < plain(25) and balanced(65) < plain(65)  # majority (malignant) tilt removed

    def test_balanced_prior_of_a_group_like_the_whole_set_is_one_half(self):
        """A group with the overall class mix (or no patients) carries no evidence: A = 0.5."""
        prior = AgePrior.fit(np.array([10, 12, 14, 50]), np.array([0, 1, 1, 1]), BALANCED)
        assert prior(81) == pytest.approx(0.5)

    def test_empty_group_gets_overall_rate(self):
        """A group without training patients falls back on the overall malignancy rate."""
        prior = AgePrior.fit(np.array([10, 50]), np.array([0, 1]), CFG)
        assert prior(81) == pytest.approx(0.5)

    def test_group_edges_are_lower_bounds(self):
        """Age 40 belongs to the [40, 80) group."""
        prior = AgePrior.fit(np.array([10, 50]), np.array([0, 1]), CFG)
        assert prior.group(39.9) == 0 and prior.group(40) == 1

    def test_nan_age_gives_no_term(self):
        """No age -> NaN, which the fusion drops."""
        assert math.isnan(AgePrior.fit(np.array([10]), np.array([0]), CFG)(float("nan")))

    @pytest.mark.parametrize("age", [-1, 121])
    def test_out_of_range_age_rejected(self, age):
        """Ages outside [0, max_age] are refused with the accepted range."""
        prior = AgePrior.fit(np.array([10]), np.array([0]), CFG)
        with pytest.raises(ValueError, match=r"\[0, 120\]"):
            prior(age)

    def test_save_load_round_trip(self, tmp_path):
        """age_prior.json read back gives the same prior."""
        prior = AgePrior.fit(np.array([10, 50, 70]), np.array([0, 1, 1]), CFG)
        prior.save(tmp_path / "a.json")
        assert AgePrior.load(tmp_path / "a.json") == prior

    def test_unknown_ages_left_out(self):
        """Patients of unknown age (NaN) do not count in any group."""
        prior = AgePrior.fit(np.array([10, float("nan"), 50]), np.array([0, 1, 1]), CFG)
        assert prior.patients == (1, 1, 0) and prior.overall == 0.5
