"""ACC, AUC, SE, SP with malignant as the positive class (paper, Eqs. 2-4), per fusion strategy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from wff.ensemble.fusion import (
    PAPER_ROW,
    PAPER_WEIGHTS,
    STRATEGIES,
    VOTE_THRESHOLD,
    Components,
    Decision,
    FusionSettings,
    fuse,
    image_p,
    vote_labels,
)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(labels: Sequence[int], predictions: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """ACC, AUC, SE (TP/(TP+FN)), SP (TN/(TN+FP)) and the confusion counts."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predictions).astype(bool)
    tp, tn = int((y & p).sum()), int((~y & ~p).sum())
    fp, fn = int((~y & p).sum()), int((y & ~p).sum())
    n = len(y)
    return {
        "acc": (tp + tn) / n if n else float("nan"),
        "auc": auc(y, scores),
        "se": tp / (tp + fn) if tp + fn else float("nan"),
        "sp": tn / (tn + fp) if tn + fp else float("nan"),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def decision_metrics(labels: Sequence[int], decisions: Sequence[Decision]) -> dict[str, float]:
    """:func:`binary_metrics` of the patients' fused decisions (label, and score for the AUC)."""
    return binary_metrics(labels, [d.label for d in decisions], [d.p_malignant for d in decisions])


def strategy_metrics(
    components: Sequence[Components],
    labels: Sequence[int],
    weights: tuple[float, float, float],
    det_threshold: float,
    vote_thresholds: Sequence[float] = (VOTE_THRESHOLD,),
) -> list[dict[str, float]]:
    """The patients' metrics with these weights at each vote threshold (Eq. 1 computed once)."""
    thresholds = np.asarray(vote_thresholds, np.float64)
    votes = [vote_labels(image_p(c, weights, det_threshold), thresholds) for c in components]
    predictions = np.array([v[0] for v in votes]).reshape(len(votes), thresholds.size)
    scores = [v[1] for v in votes]
    return [binary_metrics(labels, predictions[:, k], scores) for k in range(thresholds.size)]


def strategy_table(
    components: Sequence[Components], labels: Sequence[int], settings: FusionSettings
) -> dict[str, dict[str, float]]:
    """Table 3: every strategy's metrics, recomputed from the components (no new inference)."""
    return {
        name: decision_metrics(labels, [settings.decide(c, name) for c in components])
        for name in STRATEGIES
        if name in settings.strategies
    }


def paper_decision(components: Components, settings: FusionSettings) -> Decision:
    """Det-Seq-Age as the paper fuses it: Eq. 1 at the paper's weights (PAPER_WEIGHTS) and the
    paper's vote at 0.5, with the served settings' detection threshold and the same voting rules."""
    return fuse(components, PAPER_WEIGHTS["Det-Seq-Age"], settings.det_threshold, VOTE_THRESHOLD)


def table3(components: Sequence[Components], labels: Sequence[int], settings: FusionSettings) -> dict[str, dict[str, float]]:
    """Table 3 as reported: :func:`strategy_table` (the settings' weights, cross-validated when
    trained), then PAPER_ROW, Det-Seq-Age at the paper's weights (:func:`paper_decision`), from the
    same components."""
    table = strategy_table(components, labels, settings)
    table[PAPER_ROW] = decision_metrics(labels, [paper_decision(c, settings) for c in components])
    return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """Table 3 as fixed-width text."""
    width = max([14, *(len(name) + 1 for name in table)])
    lines = [f"{'Fusion method':<{width}}{'ACC':>7}{'AUC':>7}{'SE':>7}{'SP':>7}"]
    for name, m in table.items():
        lines.append(f"{name:<{width}}" + "".join(f"{m[k]:>7.3f}" for k in ("acc", "auc", "se", "sp")))
    return "\n".join(lines)
