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


class TestPaperRow:
    """Table 3's "Det-Seq-Age (paper λ)": the same components at the paper's weights 0.45/0.45/0.1."""

    @staticmethod
    def patients():
        """One series of one voting slice each: (D, M, A) and the label, malignant = 1."""
        rows = [((0.8, 0.7, 0.2), 1), ((0.3, 0.2, 0.9), 0), ((0.4, 0.3, 0.9), 1), ((0.2, 0.1, 0.1), 0)]
        comps = [
            Components(np.array([d], np.float32), np.array([0.9], np.float32), np.array([0], np.int32), np.array([m], np.float32), a)
            for (d, m, a), _ in rows
        ]
        return comps, [label for _, label in rows]

    def test_rows_differ_by_hand(self):
        """Age-heavy cross-validated weights 0.1/0.1/0.8 give P = 0.31, 0.77, 0.79, 0.11 (votes 0 1 1 0:
        ACC 0.5, SE 0.5, SP 0.5, AUC 3/4); the paper's give P = 0.695, 0.315, 0.405, 0.145 (votes 1 0 0 0:
        ACC 0.75, SE 0.5, SP 1, AUC 1)."""
        from wff.ensemble.fusion import PAPER_ROW, PAPER_WEIGHTS
        from wff.ensemble.metrics import paper_decision, table3

        comps, labels = self.patients()
        settings = FusionSettings(strategies={**FusionSettings().strategies, "Det-Seq-Age": (0.1, 0.1, 0.8)})
        table = table3(comps, labels, settings)
        assert list(table) == ["Det", "Det-Age", "Seq", "Seq-Age", "Det-Seq", "Det-Seq-Age", PAPER_ROW]
        served, paper = table["Det-Seq-Age"], table[PAPER_ROW]
        assert (served["acc"], served["se"], served["sp"], served["auc"]) == pytest.approx((0.5, 0.5, 0.5, 0.75))
        assert (paper["acc"], paper["se"], paper["sp"], paper["auc"]) == pytest.approx((0.75, 0.5, 1.0, 1.0))
        assert [paper_decision(c, settings).p_malignant for c in comps] == pytest.approx([0.695, 0.315, 0.405, 0.145], abs=1e-6)
        assert PAPER_WEIGHTS["Det-Seq-Age"] == (0.45, 0.45, 0.1)
        assert table3(comps, labels, FusionSettings())[PAPER_ROW] == strategy_table(comps, labels, FusionSettings())["Det-Seq-Age"]

    def test_paper_row_votes_at_one_half(self):
        """A served vote threshold of 0.75 turns the first patient (P = 0.695) benign in the served row
        only: the paper row keeps the paper's vote at 0.5."""
        from wff.ensemble.fusion import PAPER_ROW
        from wff.ensemble.metrics import table3

        comps, labels = self.patients()
        table = table3(comps, labels, FusionSettings(vote_thresholds={"Det-Seq-Age": 0.75}))
        assert (table["Det-Seq-Age"]["tp"], table[PAPER_ROW]["tp"]) == (0, 1)

    def test_terminal_table_aligns_the_longer_name(self):
        """Every line of the text table is as wide as the header, the paper row included."""
        from wff.ensemble.fusion import PAPER_ROW
        from wff.ensemble.metrics import format_table, table3

        comps, labels = self.patients()
        lines = format_table(table3(comps, labels, FusionSettings())).splitlines()
        assert len(lines) == 8 and lines[-1].startswith(PAPER_ROW) and len({len(line) for line in lines}) == 1
