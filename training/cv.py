"""Cross-validation helpers: stratified folds and the choice of l1, l2, l3 per strategy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from wff.config import FusionConfig
from wff.ensemble.fusion import (
    PAPER_WEIGHTS,
    STRATEGIES,
    VOTE_THRESHOLD,
    Components,
    FusionSettings,
    weight_grid,
)
from wff.ensemble.metrics import strategy_metrics


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> list[np.ndarray]:
    """k disjoint index arrays covering every patient, each with the classes in proportion."""
    labels = np.asarray(labels)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for i, j in enumerate(idx):
            folds[i % k].append(int(j))
    if any(len(f) == 0 for f in folds):
        raise ValueError(f"{len(labels)} patients cannot fill {k} folds; use fewer folds or more patients")
    return [np.sort(np.array(f)) for f in folds]


CV_METRICS = ("balanced_acc", "acc", "expected_acc")


def expected_acc(se: float, sp: float, prevalence: float) -> float:
    """The accuracy expected where a fraction ``prevalence`` of the patients is malignant."""
    return prevalence * se + (1 - prevalence) * sp


def _objective(m: dict[str, float], metric: str, prevalence: float = 0.5) -> float:
    """What the search maximises. ``expected_acc``: the accuracy expected where a fraction
    ``prevalence`` of the patients is malignant, prevalence x SE + (1 - prevalence) x SP, from
    the training patients' class-wise rates (``balanced_acc`` is its value at 0.5)."""
    if metric == "acc":
        return m["acc"]
    if metric in ("balanced_acc", "expected_acc"):
        pi = prevalence if metric == "expected_acc" else 0.5
        se, sp = (0.0 if np.isnan(m[k]) else m[k] for k in ("se", "sp"))
        return expected_acc(se, sp, pi)
    raise ValueError(f"fusion.cv_metric must be one of {CV_METRICS}, got {metric!r}")


def check_search(cfg: FusionConfig) -> None:
    """Reject fusion search settings that cannot work, before any training time is spent."""
    _objective({"acc": 0.0, "se": 0.0, "sp": 0.0}, cfg.cv_metric, cfg.prevalence)
    if not 0.0 < cfg.prevalence < 1.0:
        raise ValueError(f"fusion.prevalence must lie strictly between 0 and 1 (the malignant fraction of the "
                         f"patients to be diagnosed), got {cfg.prevalence}")
    grid = tuple(cfg.vote_threshold_grid)
    if not grid or any(not 0.0 < t < 1.0 for t in grid):
        raise ValueError(f"fusion.vote_threshold_grid needs values strictly between 0 and 1 (0.5: the paper's "
                         f"larger-probability rule), got {list(grid)}")


def _auc_key(m: dict[str, float]) -> float:
    """AUC as a tie-break, with an undefined AUC (one class only) ranked last."""
    return -1.0 if np.isnan(m["auc"]) else m["auc"]


def choose_weights(
    components: Sequence[Components], labels: Sequence[int], cfg: FusionConfig
) -> FusionSettings:
    """For each strategy, the grid weights and vote threshold (``cfg.vote_threshold_grid``) with
    the best out-of-fold ``cfg.cv_metric`` (then AUC).

    ``balanced_acc`` (mean of SE and SP) does not reward leaning towards the training set's
    majority class, which a test population with another class mix would punish; ``acc`` is
    plain accuracy on the training set's mix; ``expected_acc`` is the accuracy expected at
    ``cfg.prevalence``, the malignant fraction of the population the service will diagnose.

    Remaining ties go to the weights closest to the paper's (normalised), then to the vote
    threshold closest to 0.5, then to grid order, so the choice is deterministic.
    """
    check_search(cfg)
    votes = tuple(float(t) for t in cfg.vote_threshold_grid)
    strategies: dict[str, tuple[float, float, float]] = {}
    vote_thresholds: dict[str, float] = {}
    report: dict[str, dict] = {}
    for name, mask in STRATEGIES.items():
        paper = np.array(PAPER_WEIGHTS[name]) / sum(PAPER_WEIGHTS[name])
        best_key, best = None, None
        for w in weight_grid(mask, cfg.grid_step):
            closeness = -float(np.abs(np.array(w) - paper).sum())
            for t, m in zip(votes, strategy_metrics(components, labels, w, cfg.det_threshold, votes)):
                key = (_objective(m, cfg.cv_metric, cfg.prevalence), _auc_key(m), closeness, -abs(t - VOTE_THRESHOLD))
                if best_key is None or key > best_key:
                    best_key, best = key, (w, t, m)
        w, t, m = best
        strategies[name], vote_thresholds[name] = w, t
        report[name] = {"weights": list(w), "vote_threshold": t, **{k: m[k] for k in ("acc", "auc", "se", "sp")}}
    cv = {"out_of_fold": report, "patients": len(labels), "metric": cfg.cv_metric}
    if cfg.cv_metric == "expected_acc":
        cv["prevalence"] = cfg.prevalence
    return FusionSettings(cfg.strategy, cfg.det_threshold, strategies, cv, vote_thresholds)


def choose_fusion(components: Sequence[Components], labels: Sequence[int], cfg: FusionConfig) -> FusionSettings:
    """:func:`choose_weights` at ``cfg.det_threshold``; with ``cfg.det_threshold_grid``, at every
    threshold of the grid, keeping the one whose served strategy (``cfg.strategy``) scores best out
    of fold by ``cfg.cv_metric``, then by AUC, then the one closest to ``cfg.det_threshold``.

    The threshold is one value for every strategy (fusion.json has one), so it is chosen for the
    strategy that is served. The report gains ``det_threshold_candidates``: the served strategy's
    out-of-fold metric at each threshold tried.
    """
    grid = tuple(float(t) for t in cfg.det_threshold_grid)
    bad = [t for t in grid if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"fusion.det_threshold_grid values must be box scores in [0, 1], got {bad}")
    if not grid:
        return choose_weights(components, labels, cfg)
    best_key, best, tried = None, None, {}
    for threshold in grid:
        settings = choose_weights(components, labels, dataclasses.replace(cfg, det_threshold=threshold))
        m = settings.cv["out_of_fold"][cfg.strategy]
        objective = _objective(m, cfg.cv_metric, cfg.prevalence)
        tried[f"{threshold:g}"] = objective
        key = (objective, _auc_key(m), -abs(threshold - cfg.det_threshold))
        if best_key is None or key > best_key:
            best_key, best = key, settings
    best.cv["det_threshold_candidates"] = {"strategy": cfg.strategy, "metric": cfg.cv_metric, "out_of_fold": tried}
    return best


def nested_choice(
    components: Sequence[Components], labels: Sequence[int], folds: Sequence[int], cfg: FusionConfig
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Nested cross-validation of the fusion choice itself.

    For each fold k, :func:`choose_fusion` runs on the other folds' (out-of-fold) components and
    the served strategy's choice is applied to fold k, which took no part in it. Returns the
    held-out label and score of every patient and, per fold, the weights and threshold chosen:
    an unbiased estimate of what the choice (a grid, a metric) is worth on unseen patients.
    """
    labels, folds = np.asarray(labels), np.asarray(folds)
    if len(labels) != len(components) or len(folds) != len(components):
        raise ValueError(f"{len(components)} components, {len(labels)} labels and {len(folds)} folds must match")
    pred = np.zeros(len(labels), np.int64)
    score = np.zeros(len(labels), np.float64)
    chosen = []
    for k in np.unique(folds):
        inner, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        settings = choose_fusion([components[i] for i in inner], labels[inner], cfg)
        chosen.append({
            "fold": int(k),
            "weights": list(settings.served_weights),
            "det_threshold": settings.det_threshold,
            "vote_threshold": settings.vote_threshold(),
        })
        for i in held:
            decision = settings.decide(components[i])
            pred[i], score[i] = decision.label, decision.p_malignant
    return pred, score, chosen
