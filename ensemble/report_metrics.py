"""The result analyses of the paper beyond Table 3, from per-patient fusion components.

* Fig. 6: wrong patients and error rate per vertebral location, a patient counted at each of
  its locations (:func:`location_table`);
* Fig. 7: the six strategies on T1 only, T2 only (T2WI and FS-T2WI, i.e. T2 and STIR) and all
  sequences (:func:`sequence_table`, over :func:`restrict_components`);
* the ROC curve of each strategy's patient score (:func:`roc_curve`).

Everything is recomputed from :class:`wff.ensemble.fusion.Components`, as returned by the
server, with :meth:`wff.ensemble.fusion.FusionSettings.decide`: no new inference. Malignant is the positive class.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from wff.config import LOCATIONS
from wff.ensemble.fusion import STRATEGIES, Components, Decision, FusionSettings
from wff.ensemble.metrics import strategy_table

# Fig. 7 of the paper: which series each analysis keeps (wff.config.SEQUENCES names); None = all.
SEQUENCE_SUBSETS: dict[str, tuple[str, ...] | None] = {
    "T1": ("T1",),  # T1WI
    "T2": ("T2", "STIR"),  # T2WI and FS-T2WI
    "All": None,  # every series the server used: Table 3
}


def restrict_components(components: Components, series_sequences: Sequence[str], keep: Collection[str]) -> Components | None:
    """The components of only the series whose sequence is in ``keep``; None when none is.

    series_sequences (Q,): the "sequence" of each served series (SERIES_INFO). Kept series are
    renumbered 0..Q'-1 in their served order, their slices keep their order, A is unchanged.
    Every served step before the fusion works on each series alone (per-series intensity
    window, detector per slice, crop and classifier per series), so this is what the server
    returns for a request holding only the kept series' files (tests/test_report.py serves it).
    """
    n_series = len(components.series_m)
    if len(series_sequences) != n_series:
        raise ValueError(f"{len(series_sequences)} series sequences for {n_series} series; pass one per served series (SERIES_INFO)")
    kept = np.array([s in keep for s in series_sequences], bool)  # (Q,)
    if not kept.any():
        return None
    renumber = (np.cumsum(kept) - 1).astype(np.int32)  # old series index -> new index where kept
    slice_kept = kept[components.slice_series]  # (S,)
    return Components(
        slice_d=components.slice_d[slice_kept],
        slice_score=components.slice_score[slice_kept],
        slice_series=renumber[components.slice_series[slice_kept]],
        series_m=components.series_m[kept],
        age_a=components.age_a,
    )


def strategy_decisions(components: Sequence[Components], settings: FusionSettings) -> dict[str, list[Decision]]:
    """Every strategy's decision for every patient, in Table 3's strategy order."""
    return {
        name: [settings.decide(c, name) for c in components]
        for name in STRATEGIES
        if name in settings.strategies
    }


def sequence_table(
    components: Sequence[Components],
    series_sequences: Sequence[Sequence[str]],
    labels: Sequence[int],
    settings: FusionSettings,
    subsets: Mapping[str, Collection[str] | None] = SEQUENCE_SUBSETS,
) -> dict[str, dict]:
    """Fig. 7: per sequence subset, Table 3 over the patients that have a series of that subset.

    Returns {subset: {"sequences": [...] or "all", "patients": n used, "left_out": n without
    such a series, "strategies": {strategy: acc, auc, se, sp, tp, tn, fp, fn}}}; "strategies"
    is empty when no patient is left.
    """
    if not len(components) == len(series_sequences) == len(labels):
        raise ValueError(f"components, series_sequences and labels differ in length: {len(components)}, {len(series_sequences)}, {len(labels)}")
    table = {}
    for name, keep in subsets.items():
        restricted = [c if keep is None else restrict_components(c, seqs, keep) for c, seqs in zip(components, series_sequences)]
        used = [i for i, c in enumerate(restricted) if c is not None]
        table[name] = {
            "sequences": "all" if keep is None else list(keep),
            "patients": len(used),
            "left_out": len(components) - len(used),
            "strategies": strategy_table([restricted[i] for i in used], [labels[i] for i in used], settings) if used else {},
        }
    return table


def location_errors(labels: Sequence[int], predictions: Sequence[int], locations: Sequence[Sequence[str]]) -> dict[str, dict]:
    """Fig. 6: per vertebral location, patients, wrong predictions and error rate (NaN without patients).

    locations: per patient the tuple of its tumour locations (a plain string is one location).
    As in the paper, a patient with tumours at two locations counts once at each: in both
    locations' patients, and in both locations' wrong patients when its prediction is wrong, so
    the patients summed over locations are the locations of the patients, not the patients.
    Every location of wff.config.LOCATIONS is listed, in that order, then any other seen.
    """
    if not len(labels) == len(predictions) == len(locations):
        raise ValueError(f"labels, predictions and locations differ in length: {len(labels)}, {len(predictions)}, {len(locations)}")
    per_patient = [(locs,) if isinstance(locs, str) else tuple(dict.fromkeys(locs)) for locs in locations]
    seen = {loc for locs in per_patient for loc in locs}
    table = {loc: {"patients": 0, "wrong": 0} for loc in list(LOCATIONS) + sorted(seen - set(LOCATIONS))}
    for label, prediction, locs in zip(labels, predictions, per_patient):
        for loc in locs:
            table[loc]["patients"] += 1
            table[loc]["wrong"] += int(bool(label) != bool(prediction))
    for row in table.values():
        row["error_rate"] = row["wrong"] / row["patients"] if row["patients"] else float("nan")
    return table


def location_table(
    components: Sequence[Components], labels: Sequence[int], locations: Sequence[Sequence[str]], settings: FusionSettings
) -> dict[str, dict[str, dict]]:
    """:func:`location_errors` of every strategy: {strategy: {location: patients, wrong, error_rate}}."""
    return {
        name: location_errors(labels, [d.label for d in decisions], locations)
        for name, decisions in strategy_decisions(components, settings).items()
    }


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of "malignant when score >= threshold", one per distinct score, from (0, 0) to (1, 1).

    Returns fpr, tpr, thresholds, each (distinct scores + 1,) float64, thresholds descending
    with thresholds[0] = inf. Tied scores move the curve diagonally, so the trapezoid area
    equals :func:`wff.ensemble.metrics.auc`. ValueError when one class is missing.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"an ROC curve needs benign and malignant patients, got {n_neg} benign and {n_pos} malignant")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(y)[last_of_run], np.cumsum(~y)[last_of_run]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last_of_run]]
