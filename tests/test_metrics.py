"""ACC / AUC / SE / SP, malignant positive."""

import numpy as np
import pytest

from wff.ensemble.fusion import Components, FusionSettings
from wff.ensemble.metrics import auc, binary_metrics, strategy_table


class TestAuc:
    def test_perfect_and_reversed(self):
        """Perfect ranking gives 1, reversed gives 0."""
        assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
        assert auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0

    def test_ties_count_half(self):
        """One tied positive/negative pair out of four counts 0.5: AUC = 3.5 / 4."""
        assert auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)

    def test_single_class_is_nan(self):
        """AUC is undefined with one class."""
        assert np.isnan(auc([1, 1], [0.2, 0.3]))


class TestBinaryMetrics:
    def test_confusion_by_hand(self):
        """TP=2, FN=1, TN=1, FP=1 -> ACC 3/5, SE 2/3, SP 1/2."""
        m = binary_metrics([1, 1, 1, 0, 0], [1, 1, 0, 0, 1], [0.9, 0.8, 0.3, 0.2, 0.6])
        assert (m["acc"], m["se"], m["sp"]) == pytest.approx((0.6, 2 / 3, 0.5))


class TestStrategyTable:
    def test_every_strategy_recomputed(self):
        """A detector-only signal makes Det perfect while Seq, driven by M, is inverted."""
        comps = [
            Components(np.array([d], np.float32), np.array([0.9], np.float32), np.array([0], np.int32), np.array([m], np.float32), float("nan"))
            for d, m in [(0.9, 0.1), (0.8, 0.2), (0.2, 0.9), (0.1, 0.7)]
        ]
        table = strategy_table(comps, [1, 1, 0, 0], FusionSettings())
        assert list(table) == ["Det", "Det-Age", "Seq", "Seq-Age", "Det-Seq", "Det-Seq-Age"]
        assert table["Det"]["acc"] == 1.0 and table["Seq"]["acc"] == 0.0
