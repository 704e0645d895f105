"""Cross-validation folds and the choice of fusion weights."""

import dataclasses

import numpy as np
import pytest

from wff.config import FusionConfig
from wff.ensemble.fusion import Components
from wff.training.cv import choose_fusion, choose_weights, nested_choice, stratified_folds


def patient(d, m, a=float("nan")):
    return Components(np.array([d], np.float32), np.array([0.9], np.float32), np.array([0], np.int32), np.array([m], np.float32), a)


class TestStratifiedFolds:
    def test_partition_and_balance(self):
        """Folds are disjoint, cover everyone, and split each class evenly."""
        labels = np.array([0] * 8 + [1] * 12)
        folds = stratified_folds(labels, 4, seed=0)
        assert sorted(np.concatenate(folds).tolist()) == list(range(20))
        assert [int(labels[f].sum()) for f in folds] == [3, 3, 3, 3]

    def test_too_few_patients(self):
        """More folds than patients is refused with advice."""
        with pytest.raises(ValueError, match="fewer folds"):
            stratified_folds([0, 1], 4, seed=0)


class TestChooseWeights:
    def test_det_seq_weights_follow_the_informative_model(self):
        """When only M separates the classes, Det-Seq puts most weight on Seq."""
        comps = [patient(0.9, 0.9), patient(0.8, 0.7), patient(0.7, 0.2), patient(0.95, 0.1)]
        settings = choose_weights(comps, [1, 1, 0, 0], FusionConfig(grid_step=0.1))
        l1, l2, l3 = settings.strategies["Det-Seq"]
        assert l2 > l1 and l3 == 0
        assert settings.cv["out_of_fold"]["Det-Seq"]["acc"] == 1.0
        assert settings.strategies["Det"] == (1.0, 0.0, 0.0)

    def test_balanced_accuracy_does_not_follow_the_majority(self):
        """With 3 malignant : 1 benign, "always malignant" wins plain ACC; balanced ACC prefers the model that separates."""
        # D says malignant for everyone (ACC 0.75); M separates 2 of 3 malignant and the benign (ACC 0.75, balanced 0.83)
        comps = [patient(0.9, 0.9), patient(0.9, 0.8), patient(0.9, 0.2), patient(0.9, 0.1)]
        labels = [1, 1, 1, 0]
        balanced = choose_weights(comps, labels, FusionConfig(grid_step=0.1, cv_metric="balanced_acc"))
        l1, l2, _ = balanced.strategies["Det-Seq"]
        assert l2 > l1 and balanced.cv["metric"] == "balanced_acc"
        out = balanced.cv["out_of_fold"]["Det-Seq"]
        assert out["sp"] == 1.0 and out["se"] == pytest.approx(2 / 3)

    def test_unknown_metric(self):
        with pytest.raises(ValueError, match="cv_metric"):
            choose_weights([patient(0.9, 0.9), patient(0.1, 0.1)], [1, 0], FusionConfig(cv_metric="f1"))


class TestOperatingPoint:
    # M alone: malignant patients 0.9, 0.7, 0.55; benign 0.6, 0.45, 0.3, 0.2. At 0.5 the benign 0.6 is a
    # false positive (SE 1, SP 3/4); at 0.65 the malignant 0.55 is missed instead (SE 2/3, SP 1).
    COMPS = [patient(0.5, m) for m in (0.9, 0.7, 0.55, 0.6, 0.45, 0.3, 0.2)]
    LABELS = [1, 1, 1, 0, 0, 0, 0]

    def choose(self, **kw):
        return choose_weights(self.COMPS, self.LABELS, FusionConfig(grid_step=0.25, vote_threshold_grid=(0.5, 0.65), **kw))

    def test_a_rare_malignant_class_moves_the_vote_threshold_up(self):
        """expected_acc at a low prevalence prefers SP: the higher vote threshold wins, and it is served."""
        settings = self.choose(cv_metric="expected_acc", prevalence=0.2)
        assert settings.vote_threshold("Seq") == 0.65
        out = settings.cv["out_of_fold"]["Seq"]
        assert (out["se"], out["sp"], out["vote_threshold"]) == (pytest.approx(2 / 3), 1.0, 0.65)
        assert settings.cv["prevalence"] == 0.2
        assert [settings.decide(c, "Seq").label for c in self.COMPS] == [1, 1, 0, 0, 0, 0, 0]

    def test_a_common_malignant_class_keeps_the_paper_rule(self):
        """At prevalence 0.8, SE matters more: 0.5 (the paper's larger-probability rule) wins."""
        settings = self.choose(cv_metric="expected_acc", prevalence=0.8)
        assert settings.vote_threshold("Seq") == 0.5
        assert [settings.decide(c, "Seq").label for c in self.COMPS] == [1, 1, 1, 1, 0, 0, 0]

    def test_ties_go_to_the_paper_rule(self):
        """balanced_acc: 0.875 at both thresholds, and AUC is the same, so 0.5 is kept."""
        assert self.choose(cv_metric="balanced_acc").vote_threshold("Seq") == 0.5

    def test_settings_round_trip(self, tmp_path):
        from wff.ensemble.fusion import load_fusion_settings

        settings = self.choose(cv_metric="expected_acc", prevalence=0.2)
        settings.save(tmp_path / "fusion.json")
        again = load_fusion_settings(tmp_path / "fusion.json")
        assert again.vote_thresholds == settings.vote_thresholds and again.vote_threshold("Seq") == 0.65

    @pytest.mark.parametrize("kw, match", [
        ({"cv_metric": "expected_acc", "prevalence": 1.0}, "fusion.prevalence"),
        ({"vote_threshold_grid": ()}, "fusion.vote_threshold_grid"),
        ({"vote_threshold_grid": (0.5, 1.0)}, "fusion.vote_threshold_grid"),
    ])
    def test_bad_search_settings_are_refused(self, kw, match):
        with pytest.raises(ValueError, match=match):
            choose_weights(self.COMPS, self.LABELS, FusionConfig(**kw))


def series_patient(scores, d, m=0.5):
    n = len(scores)
    return Components(np.array(d, np.float32), np.array(scores, np.float32), np.zeros(n, np.int32), np.array([m], np.float32), float("nan"))


class TestChooseFusion:
    # One confident slice whose D misleads, two low-scoring slices whose D is right: only a low
    # det_threshold lets the informative slices vote.
    COMPS = [series_patient([0.9, 0.3, 0.3], [0.2, 0.9, 0.9]), series_patient([0.9, 0.3, 0.3], [0.3, 0.8, 0.9]),
             series_patient([0.9, 0.3, 0.3], [0.8, 0.1, 0.1]), series_patient([0.9, 0.3, 0.3], [0.7, 0.2, 0.1])]
    LABELS = [1, 1, 0, 0]

    def test_grid_lets_cv_lower_the_threshold(self):
        cfg = FusionConfig(grid_step=0.25, strategy="Det", det_threshold_grid=(0.1, 0.5))
        settings = choose_fusion(self.COMPS, self.LABELS, cfg)
        assert settings.det_threshold == 0.1
        tried = settings.cv["det_threshold_candidates"]
        assert tried["out_of_fold"] == {"0.1": 1.0, "0.5": 0.0} and tried["strategy"] == "Det"
        assert settings.cv["out_of_fold"]["Det"]["acc"] == 1.0

    def test_without_grid_the_threshold_is_kept(self):
        cfg = FusionConfig(grid_step=0.25, strategy="Det", det_threshold_grid=())
        settings = choose_fusion(self.COMPS, self.LABELS, cfg)
        assert settings.det_threshold == 0.5 and "det_threshold_candidates" not in settings.cv
        assert settings.strategies == choose_weights(self.COMPS, self.LABELS, cfg).strategies
        assert settings.cv["out_of_fold"]["Det"]["acc"] == 0.0

    def test_ties_keep_the_configured_threshold(self):
        """Thresholds under every slice's score give the same votes: the one nearest det_threshold wins."""
        cfg = FusionConfig(grid_step=0.25, strategy="Det", det_threshold=0.2, det_threshold_grid=(0.05, 0.1, 0.25))
        # all three let every slice vote (0.3 >= 0.25): same metric and AUC; 0.25 is nearest 0.2
        settings = choose_fusion(self.COMPS, self.LABELS, cfg)
        assert settings.det_threshold == 0.25
        assert set(settings.cv["det_threshold_candidates"]["out_of_fold"].values()) == {1.0}

    def test_nested_choice_scores_each_fold_with_the_others_choice(self):
        """Each fold is decided by the setting chosen on the other folds; the grid's gain shows held out."""
        folds = [0, 1, 0, 1]
        cfg = FusionConfig(grid_step=0.25, strategy="Det", det_threshold_grid=(0.1, 0.5))
        pred, score, chosen = nested_choice(self.COMPS, self.LABELS, folds, cfg)
        assert pred.tolist() == self.LABELS and [c["det_threshold"] for c in chosen] == [0.1, 0.1]
        assert [c["fold"] for c in chosen] == [0, 1] and score[0] > 0.5 > score[2]
        fixed, _, chosen = nested_choice(self.COMPS, self.LABELS, folds, dataclasses.replace(cfg, det_threshold_grid=()))
        assert fixed.tolist() == [0, 0, 1, 1] and [c["det_threshold"] for c in chosen] == [0.5, 0.5]

    def test_nested_choice_length_mismatch(self):
        with pytest.raises(ValueError, match="must match"):
            nested_choice(self.COMPS, self.LABELS, [0, 1], FusionConfig())

    def test_grid_out_of_range(self):
        with pytest.raises(ValueError, match="det_threshold_grid"):
            choose_fusion(self.COMPS, self.LABELS, FusionConfig(det_threshold_grid=(0.5, 1.5)))



class TestChosenSettings:
    def test_decisions_reproduce_the_out_of_fold_metrics(self):
        """The chosen settings' decisions on the components reproduce the out-of-fold metrics the weights
        were chosen on (an over-confident D, right for 7 of 10 patients of each class, M uninformative)."""
        from wff.ensemble.metrics import strategy_table

        comps, labels = [], []
        for y in (0, 1):
            for i in range(10):
                right = i < 7
                comps.append(patient(0.99 if (y == 1) == right else 0.01, 0.5, a=0.7 if y else 0.3))
                labels.append(y)
        settings = choose_weights(comps, labels, FusionConfig(grid_step=0.1))
        table = strategy_table(comps, labels, settings)
        for name, chosen in settings.cv["out_of_fold"].items():
            assert table[name]["acc"] == chosen["acc"] and table[name]["auc"] == pytest.approx(chosen["auc"])
