"""The age module: P(malignant | age group), smoothed where a group is sparse; its Fig. 5 figure."""

import json
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


class TestSparseGroupsOnly:
    """age.min_patients: dense groups take their raw rate (Fig. 5's statistic), sparse ones are smoothed."""

    # groups [0, 40): 4 patients, 1 malignant; [40, 80): 5 patients, 4 malignant; 80+: 1 patient, malignant
    AGES = np.array([10, 20, 30, 35, 45, 50, 60, 70, 75, 85])
    LABELS = np.array([0, 0, 1, 0, 1, 1, 1, 0, 1, 1])

    def test_hand_computed_rates(self):
        """min_patients 4, alpha 2: 1/4 and 4/5 raw; the one-patient group (1 + 2 * 0.6) / (1 + 2)."""
        cfg = AgePriorConfig(edges=(0, 40, 80), alpha=2.0, min_patients=4, balanced=False)
        prior = AgePrior.fit(self.AGES, self.LABELS, cfg)
        assert prior.patients == (4, 5, 1) and prior.malignant == (1, 4, 1) and prior.overall == pytest.approx(0.6)
        assert prior.p_malignant == pytest.approx((0.25, 0.8, 2.2 / 3))
        assert prior.smoothed() == (False, False, True)

    def test_threshold_is_at_least(self):
        """A group of exactly min_patients is raw; one more required and it is smoothed."""
        at = AgePrior.fit(self.AGES, self.LABELS, AgePriorConfig(edges=(0, 40, 80), alpha=2.0, min_patients=5, balanced=False))
        assert at(50) == pytest.approx(0.8) and at(20) == pytest.approx((1 + 2 * 0.6) / (4 + 2))

    def test_balanced_applies_to_raw_rates(self):
        """The equal-prior correction divides the class odds out of the raw rate too."""
        cfg = AgePriorConfig(edges=(0, 40, 80), alpha=2.0, min_patients=4, balanced=True)
        odds = (0.8 / 0.2) / (0.6 / 0.4)
        assert AgePrior.fit(self.AGES, self.LABELS, cfg)(50) == pytest.approx(odds / (1 + odds))

    def test_default_smooths_every_group_as_before(self):
        """The default (None, the small profile) gives the smoothed prior of every group, as before the key."""
        from wff.config import SMALL

        assert SMALL.age.min_patients is None
        prior = AgePrior.fit(self.AGES, self.LABELS, AgePriorConfig(edges=(0, 40, 80), alpha=2.0, balanced=False))
        assert prior.p_malignant == pytest.approx(((1 + 1.2) / 6, (4 + 1.2) / 7, (1 + 1.2) / 3))
        ages = np.repeat(np.arange(5, 95, 10), 3)  # three patients in each of the small profile's nine groups
        labels = np.arange(ages.size) % 2
        small = AgePrior.fit(ages, labels, SMALL.age)
        overall = labels.mean()
        for g, age in enumerate(range(5, 95, 10)):
            rate = (labels[ages == age].sum() + 4 * overall) / (3 + 4)
            odds = rate / (1 - rate) / (overall / (1 - overall))
            assert small.p_malignant[g] == pytest.approx(odds / (1 + odds))

    def test_paper_profile_uses_the_raw_statistic(self):
        from wff.config import PAPER

        assert PAPER.age.min_patients == 10 and PAPER.age.balanced is False
        ages = np.concatenate([np.full(12, 65.0), np.full(3, 15.0)])
        labels = np.array([1] * 9 + [0] * 3 + [0, 0, 1])
        prior = AgePrior.fit(ages, labels, PAPER.age)
        assert prior(65) == pytest.approx(9 / 12)  # 12 patients: raw
        assert prior(15) == pytest.approx((1 + 4 * 10 / 15) / (3 + 4))  # 3 patients: smoothed

    @pytest.mark.parametrize("value", [0, -3, 2.5, True])
    def test_bad_min_patients_refused(self, value):
        with pytest.raises(ValueError, match="age.min_patients"):
            AgePriorConfig(min_patients=value)

    def test_figure_written(self, tmp_path):
        """The Fig. 5 PNG is written: a readable image of non-trivial size."""
        cfg = AgePriorConfig(edges=(0, 40, 80), alpha=2.0, min_patients=4, balanced=False)
        path = AgePrior.fit(self.AGES, self.LABELS, cfg).plot(tmp_path / "age_prior.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        from matplotlib.image import imread

        assert imread(path).shape[:2] == (480, 960)

    def test_group_names(self):
        prior = AgePrior.fit(self.AGES, self.LABELS, CFG)
        assert prior.group_names() == ["0-40", "40-80", "80+"]

    def test_new_fields_round_trip_and_old_files_load(self, tmp_path):
        """min_patients and balanced survive save/load; a file without them (written before) loads as all-smoothed."""
        cfg = AgePriorConfig(edges=(0, 40, 80), alpha=2.0, min_patients=4, balanced=False)
        prior = AgePrior.fit(self.AGES, self.LABELS, cfg)
        prior.save(tmp_path / "a.json")
        assert AgePrior.load(tmp_path / "a.json") == prior
        old = {k: v for k, v in prior.to_dict().items() if k not in ("min_patients", "balanced")}
        (tmp_path / "old.json").write_text(json.dumps(old))
        loaded = AgePrior.load(tmp_path / "old.json")
        assert loaded.min_patients is None and loaded.balanced is None and loaded.p_malignant == prior.p_malignant
        assert loaded.smoothed() == (True, True, True)
        loaded.plot(tmp_path / "old.png")
