"""The fusion step: Eq. 1 of the paper and the two majority votes.

Per image j of series i of patient p (paper, Eq. 1)::

    P_i^j = l1 * D_i^j + l2 * M_i + l3 * A_p

D is the detector's P(malignant) for the image's best box, M the sequence classifier's
P(malignant) for the series, A the age module's P(malignant | age). The weighted sum is
divided by the sum of the weights of the terms present, so P stays a probability and
"P >= 0.5" is the paper's "category with the larger probability" for any weights (the paper's
Det-Age weights 0.45/0/0.1 do not sum to one). Images vote by P >= 0.5; the majority of images
gives the series, the majority of series gives the patient.

The vote threshold (0.5 above) is a per-strategy setting: with ``fusion.vote_threshold_grid`` the
cross-validation chooses it with the weights, for an operating point other than the equal-prior
one (``fusion.cv_metric = "expected_acc"`` at ``fusion.prevalence``). The default grid holds 0.5
only, the paper's rule.

Rules for the cases the paper leaves open (each has a unit test):

* Images that vote: slices whose best box scores >= ``det_threshold``. A series with no such
  slice falls back on its single best-scoring box; a series with no box at all has no Det term.
* A term that is missing (no box, no age) drops out of the weighted mean. A series none of
  whose active terms is present abstains; a patient whose series all abstain gets P = 0.5.
* Ties: an image with P = t (the vote threshold) votes malignant; a series with as many
  malignant as benign image votes takes its mean P (>= t malignant); likewise a patient with tied
  series votes.
  Malignant is the positive class, so ties lean to the finding that must not be missed.
* The patient's continuous score (for AUC) is the mean over voting series of the series'
  mean image P.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

# Table 3 of the paper: which of (Det, Seq, Age) each strategy uses.
STRATEGIES: dict[str, tuple[bool, bool, bool]] = {
    "Det": (True, False, False),
    "Det-Age": (True, False, True),
    "Seq": (False, True, False),
    "Seq-Age": (False, True, True),
    "Det-Seq": (True, True, False),
    "Det-Seq-Age": (True, True, True),
}
# The paper's lambdas (l1, l2, l3) of Eq. 1. Results, "Comparison of different fusion strategies",
# the paragraph under Table 3, states Det-Seq-Age 0.45/0.45/0.1, Det-Age 0.45/0/0.1 and Det
# 0.45/0/0; the Seq rows follow the same pattern. FusionSettings defaults to them, the
# cross-validation breaks ties towards them, and Table 3's row PAPER_ROW uses the Det-Seq-Age entry.
PAPER_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "Det": (0.45, 0.0, 0.0),
    "Det-Age": (0.45, 0.0, 0.1),
    "Seq": (0.0, 0.45, 0.0),
    "Seq-Age": (0.0, 0.45, 0.1),
    "Det-Seq": (0.45, 0.45, 0.0),
    "Det-Seq-Age": (0.45, 0.45, 0.1),
}
VOTE_THRESHOLD = 0.5
PAPER_ROW = "Det-Seq-Age (paper λ)"  # Table 3's extra row: Det-Seq-Age at the paper's weights
# fusion.json key of a removed option: Platt calibration of D and M before Eq. 1 (no gain measured,
# docs/results.md). Absent, null or the identity {"d": [1, 0], "m": [1, 0]} load; anything else is refused.
REMOVED_CALIBRATION = "calibration"
IDENTITY_CALIBRATION = {"d": [1.0, 0.0], "m": [1.0, 0.0]}


def best_boxes(
    boxes: np.ndarray, scores: np.ndarray, malignancy: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The highest-scoring valid detection of every slice.

    boxes (S, K, 4), scores (S, K), malignancy (S, K), counts (S,) or (S, 1): detector outputs,
    the first ``count`` of K valid. Returns slice_d (S,) float32 (NaN where no box),
    slice_score (S,) float32 (0 where no box) and slice_box (S, 4) float32 (zeros where no box).
    """
    n, k = scores.shape
    valid = np.arange(k)[None, :] < np.asarray(counts).reshape(n, 1)  # (S, K)
    has_box = valid.any(axis=1)
    best = np.argmax(np.where(valid, scores, -np.inf), axis=1)  # (S,)
    rows = np.arange(n)
    slice_d = np.where(has_box, malignancy[rows, best], np.nan).astype(np.float32)
    slice_score = np.where(has_box, scores[rows, best], 0.0).astype(np.float32)
    slice_box = np.where(has_box[:, None], boxes[rows, best], 0.0).astype(np.float32)
    return slice_d, slice_score, slice_box


@dataclass(frozen=True)
class Components:
    """Everything the fusion needs for one patient; what the served ensemble returns."""

    slice_d: np.ndarray  # (S,) float32 D per slice; NaN = no box on the slice
    slice_score: np.ndarray  # (S,) float32 best box score per slice
    slice_series: np.ndarray  # (S,) int32 series index 0..Q-1 of each slice
    series_m: np.ndarray  # (Q,) float32 M per series
    age_a: float  # A = P(malignant | age); NaN = no age known

    def to_dict(self) -> dict:
        return {
            "slice_d": [None if math.isnan(v) else float(v) for v in self.slice_d],
            "slice_score": [float(v) for v in self.slice_score],
            "slice_series": [int(v) for v in self.slice_series],
            "series_m": [float(v) for v in self.series_m],
            "age_a": None if math.isnan(self.age_a) else float(self.age_a),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Components":
        return cls(
            slice_d=np.array([np.nan if v is None else v for v in data["slice_d"]], np.float32),
            slice_score=np.array(data["slice_score"], np.float32),
            slice_series=np.array(data["slice_series"], np.int32),
            series_m=np.array(data["series_m"], np.float32),
            age_a=float("nan") if data["age_a"] is None else float(data["age_a"]),
        )


@dataclass(frozen=True)
class Decision:
    label: int  # 1 malignant, 0 benign
    p_malignant: float  # patient score in [0, 1]
    series_votes: np.ndarray  # (Q,) int32: 1 malignant, 0 benign, -1 abstained
    series_p: np.ndarray  # (Q,) float32 mean image P per series; NaN = abstained


def voting_slices(scores: np.ndarray, d: np.ndarray, det_threshold: float) -> np.ndarray:
    """Indices (into the series' slices) of the images that vote with a Det term."""
    has_box = ~np.isnan(d)
    voting = np.flatnonzero(has_box & (scores >= det_threshold))
    if voting.size == 0 and has_box.any():
        voting = np.array([np.argmax(np.where(has_box, scores, -np.inf))])
    return voting


def series_image_p(
    d: np.ndarray, scores: np.ndarray, m: float, a: float, weights: tuple[float, float, float], det_threshold: float
) -> np.ndarray:
    """P of every voting image of one series (Eq. 1, normalised); empty when the series abstains."""
    l1, l2, l3 = weights
    fixed_w, fixed_sum = 0.0, 0.0  # the terms shared by all images of the series
    if l2 > 0 and not math.isnan(m):
        fixed_w, fixed_sum = fixed_w + l2, fixed_sum + l2 * m
    if l3 > 0 and not math.isnan(a):
        fixed_w, fixed_sum = fixed_w + l3, fixed_sum + l3 * a
    voting = voting_slices(scores, d, det_threshold) if l1 > 0 else np.array([], np.int64)
    if voting.size:
        return ((l1 * d[voting] + fixed_sum) / (l1 + fixed_w)).astype(np.float32)
    if fixed_w > 0:
        return np.array([fixed_sum / fixed_w], np.float32)
    return np.array([], np.float32)


def _majority(malignant: np.ndarray, benign: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """1 where malignant votes outnumber benign ones, 0 where fewer, ``tie`` where as many."""
    return np.where(malignant != benign, malignant > benign, tie).astype(np.int64)


def _check_uncalibrated(calibration, where: str) -> None:
    """ValueError unless ``calibration`` (fusion.json's removed key) leaves D and M as they are."""
    if calibration in (None, {}, IDENTITY_CALIBRATION):
        return
    raise ValueError(
        f"{where}: \"{REMOVED_CALIBRATION}\": {json.dumps(calibration)} calibrates D and M before Eq. 1, which wff no "
        f"longer does (removed: no gain measured, docs/results.md); choose the fusion again without it with "
        f"wff dev refit-fusion ARTIFACTS (then wff repo build again for a built repository)"
    )


def _check_vote_threshold(t: float) -> None:
    if not 0.0 < t < 1.0:
        raise ValueError(f"a vote threshold must lie strictly between 0 and 1, got {t}")


def image_p(components: Components, weights: tuple[float, float, float], det_threshold: float) -> list[np.ndarray]:
    """Eq. 1's P of every voting image, one array per series (empty where the series abstains)."""
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fusion weights must be >= 0 with a positive sum, got {weights}")
    out = []
    for q in range(len(components.series_m)):
        members = components.slice_series == q
        out.append(series_image_p(
            components.slice_d[members],
            components.slice_score[members],
            float(components.series_m[q]),
            components.age_a,
            weights,
            det_threshold,
        ))
    return out


def _votes_at(
    series_images: list[np.ndarray], vote_thresholds: np.ndarray
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """The majority votes at each of T thresholds: patient labels (T,), patient score,
    series votes (T, Q) int32 (-1 = abstained) and series mean P (Q,) float32 (NaN = abstained)."""
    t = np.asarray(vote_thresholds, np.float64).reshape(-1)
    for value in t:
        _check_vote_threshold(float(value))
    t_images = t[:, None].astype(np.float32)  # images compare in float32
    n_series = len(series_images)
    series_votes = np.full((t.size, n_series), -1, np.int32)
    series_p = np.full(n_series, np.nan, np.float32)
    for q, p in enumerate(series_images):
        if p.size:
            series_p[q] = p.mean()
            malignant = (p[None, :] >= t_images).sum(axis=1)
            series_votes[:, q] = _majority(malignant, p.size - malignant, float(series_p[q]) >= t)
    voted = series_votes[0] >= 0
    if not voted.any():
        return np.ones(t.size, np.int64), VOTE_THRESHOLD, series_votes, series_p
    p_patient = float(series_p[voted].mean())
    malignant = (series_votes[:, voted] == 1).sum(axis=1)
    return _majority(malignant, int(voted.sum()) - malignant, p_patient >= t), p_patient, series_votes, series_p


def vote(series_images: list[np.ndarray], vote_threshold: float = VOTE_THRESHOLD) -> Decision:
    """The majority votes over :func:`image_p`'s output: images -> series -> patient."""
    labels, p_patient, series_votes, series_p = _votes_at(series_images, np.array([vote_threshold]))
    return Decision(int(labels[0]), p_patient, series_votes[0], series_p)


def vote_labels(series_images: list[np.ndarray], vote_thresholds: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`vote` at many thresholds at once (the cross-validation's search): the patient's
    label at each (int array) and its score (the same at every threshold)."""
    labels, p_patient, _, _ = _votes_at(series_images, vote_thresholds)
    return labels, p_patient


def fuse(
    components: Components,
    weights: tuple[float, float, float],
    det_threshold: float,
    vote_threshold: float = VOTE_THRESHOLD,
) -> Decision:
    """Eq. 1 per image, then majority votes at ``vote_threshold``: images -> series -> patient."""
    return vote(image_p(components, weights, det_threshold), vote_threshold)


@dataclass(frozen=True)
class FusionSettings:
    """The fusion weights chosen by cross-validation, as written to fusion.json."""

    served_strategy: str = "Det-Seq-Age"
    det_threshold: float = 0.5
    strategies: dict[str, tuple[float, float, float]] = field(default_factory=lambda: dict(PAPER_WEIGHTS))
    cv: dict = field(default_factory=dict)  # per strategy: chosen weights and fold metrics
    vote_thresholds: dict[str, float] = field(default_factory=dict)  # per strategy; absent: 0.5

    def __post_init__(self) -> None:  # every strategy gets its vote threshold, 0.5 unless given
        stray = sorted(set(self.vote_thresholds) - set(self.strategies))
        if stray:
            raise ValueError(f"vote_thresholds name strategies {stray} that have no weights")
        for t in self.vote_thresholds.values():
            _check_vote_threshold(float(t))
        object.__setattr__(self, "vote_thresholds",
                           {k: float(self.vote_thresholds.get(k, VOTE_THRESHOLD)) for k in self.strategies})

    @property
    def served_weights(self) -> tuple[float, float, float]:
        return self.strategies[self.served_strategy]

    def vote_threshold(self, strategy: str | None = None) -> float:
        return self.vote_thresholds.get(strategy or self.served_strategy, VOTE_THRESHOLD)

    def decide(self, components: Components, strategy: str | None = None) -> Decision:
        """The diagnosis of one patient by ``strategy`` (default: the served one): :func:`fuse`
        with the strategy's weights and vote threshold."""
        weights = self.strategies[strategy or self.served_strategy]
        return fuse(components, weights, self.det_threshold, self.vote_threshold(strategy))

    def to_dict(self, cv: bool = True) -> dict:
        """fusion.json's content; ``cv=False`` leaves out the cross-validation record (per-fold
        metrics), keeping only what makes the decisions."""
        data = {
            "served_strategy": self.served_strategy,
            "det_threshold": self.det_threshold,
            "strategies": {k: list(v) for k, v in self.strategies.items()},
            "vote_thresholds": dict(self.vote_thresholds),
        }
        if cv:
            data["cv"] = self.cv
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "fusion settings") -> "FusionSettings":
        _check_uncalibrated(data.get(REMOVED_CALIBRATION), where)
        try:
            strategies = {k: tuple(float(x) for x in v) for k, v in data["strategies"].items()}
            votes = {k: float(v) for k, v in data.get("vote_thresholds", {}).items()}  # absent: 0.5 for every strategy
            settings = cls(data["served_strategy"], float(data["det_threshold"]), strategies, data.get("cv", {}), votes)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: malformed fusion settings ({e}); rebuild them with wff train") from e
        unknown = sorted(set(strategies) - set(STRATEGIES))
        if unknown or settings.served_strategy not in strategies:
            raise ValueError(f"{where}: strategies must be among {list(STRATEGIES)}, served one included")
        if any(len(w) != 3 for w in strategies.values()):
            raise ValueError(f"{where}: every strategy needs three weights (l1, l2, l3)")
        return settings

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_fusion_settings(path: str | Path) -> FusionSettings:
    path = Path(path)
    return FusionSettings.from_dict(json.loads(path.read_text()), where=str(path))


def fusion_parameters(settings: FusionSettings) -> dict[str, str]:
    """The fusion settings as Triton config parameters (wff repo build writes them into the fusion
    model's config; clients read them back through get_model_config): fusion.json's keys
    (:meth:`FusionSettings.to_dict`) without the cross-validation record, strings as they are and
    everything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in settings.to_dict(cv=False).items()}


def settings_from_parameters(parameters: dict[str, str]) -> FusionSettings:
    """Inverse of :func:`fusion_parameters` (values as plain strings). Vote thresholds a config
    lacks take :meth:`FusionSettings.from_dict`'s default, 0.5."""
    where = "fusion model config parameters"
    keys = {f.name for f in fields(FusionSettings)} | {REMOVED_CALIBRATION}
    try:
        data = {k: v if k == "served_strategy" else json.loads(v) for k, v in parameters.items() if k in keys}
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: a value is not JSON ({e}); rebuild the repository with wff repo build") from e
    return FusionSettings.from_dict(data, where=where)


def weight_grid(mask: tuple[bool, bool, bool], step: float) -> list[tuple[float, float, float]]:
    """Weights on the simplex with step ``step``, positive exactly on the strategy's terms."""
    n = round(1 / step)
    if not math.isclose(n * step, 1.0):
        raise ValueError(f"grid_step must divide 1, got {step}")
    active = [i for i, on in enumerate(mask) if on]
    grid = []
    for parts in itertools.product(range(1, n + 1), repeat=len(active)):
        if sum(parts) != n:
            continue
        w = [0.0, 0.0, 0.0]
        for i, p in zip(active, parts):
            w[i] = round(p * step, 10)
        grid.append(tuple(w))
    return grid
