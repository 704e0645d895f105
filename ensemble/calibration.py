"""Calibration of the image terms D and M before Eq. 1 (Platt scaling, equal class priors).

Eq. 1 averages probabilities: P = l1 D + l2 M + l3 A. A linear pool of probabilities lets the
most extreme term decide: a detector that says 0.99 on a slice outvotes an age term of 0.2 at
any weights that keep the detector's say. Networks trained with cross-entropy on a few hundred
patients are over-confident in exactly that way, so their outputs are first mapped to
calibrated probabilities, P(malignant | output), fitted on the out-of-fold components of the
cross-validation (training patients only), in the same equal-prior footing as every other
WFF term (each class weighs half, each patient the same within its class)::

    D' = sigmoid(a_D * logit(D) + b_D)        M' = sigmoid(a_M * logit(M) + b_M)

The age term is already a calibrated frequency (ensemble.age_prior) and is left as it is.
``Platt()`` (a = 1, b = 0) is the identity, for runs without calibration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before the logit
RIDGE = 1e-3  # tiny L2 pull of (a, b) towards the identity (1, 0): keeps the fit finite on separable data


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Platt:
    """p -> sigmoid(a * logit(p) + b); NaN (a missing term) stays NaN."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)
        out = 1.0 / (1.0 + np.exp(-(self.a * logit(p) + self.b)))
        return np.where(np.isnan(p), np.nan, out).astype(np.float32)

    @property
    def is_identity(self) -> bool:
        return self.a == 1.0 and self.b == 0.0

    def to_list(self) -> list[float]:
        return [self.a, self.b]

    @classmethod
    def fit(cls, p: np.ndarray, y: np.ndarray, weight: np.ndarray, iterations: int = 50) -> "Platt":
        """Weighted logistic regression of y on logit(p) by Newton's method.

        p, y (0/1), weight: one entry per observation. Needs both classes with positive weight;
        otherwise the identity is returned (nothing to calibrate against).
        """
        p, y, w = (np.asarray(v, np.float64).reshape(-1) for v in (p, y, weight))
        if not (p.shape == y.shape == w.shape):
            raise ValueError(f"p, y and weight must have one entry each per observation: {p.shape}, {y.shape}, {w.shape}")
        keep = ~np.isnan(p) & (w > 0)
        p, y, w = p[keep], y[keep], w[keep]
        if w[y == 1].sum() <= 0 or w[y == 0].sum() <= 0:
            return cls()
        w = w / w.sum()
        x = np.stack([logit(p), np.ones_like(p)], axis=1)  # (n, 2)
        prior = np.array([1.0, 0.0])

        def loss(t: np.ndarray) -> float:
            z = x @ t
            return float((w * (np.logaddexp(0.0, z) - y * z)).sum() + 0.5 * RIDGE * ((t - prior) ** 2).sum())

        theta, current = prior.copy(), loss(prior)
        for _ in range(iterations):  # Newton's method with step halving (the loss is convex)
            q = 1.0 / (1.0 + np.exp(-(x @ theta)))
            grad = x.T @ (w * (q - y)) + RIDGE * (theta - prior)
            hess = (x * (w * q * (1 - q))[:, None]).T @ x + RIDGE * np.eye(2)
            step = np.linalg.solve(hess, grad)
            scale = 1.0
            while scale > 1e-6 and loss(theta - scale * step) > current:
                scale /= 2
            theta = theta - scale * step
            current = loss(theta)
            if np.abs(scale * step).max() < 1e-10:
                break
        if not np.all(np.isfinite(theta)):
            raise ValueError("calibration fit diverged; check the components for non-finite values")
        return cls(float(theta[0]), float(theta[1]))


def balanced_weights(labels: np.ndarray, per_patient: np.ndarray) -> np.ndarray:
    """Observation weights giving each class half the total and each patient an equal share of
    its class. labels: the observation's patient label; per_patient: 1 / (observations of that
    patient), so a patient with many slices counts no more than one with few."""
    labels = np.asarray(labels)
    w = np.asarray(per_patient, np.float64).copy()
    for cls_ in (0, 1):
        total = w[labels == cls_].sum()
        if total > 0:
            w[labels == cls_] *= 0.5 / total
    return w


@dataclass(frozen=True)
class Calibration:
    """The calibration of D and of M (fitted by wff.training.cv.fit_calibration)."""

    d: Platt = Platt()
    m: Platt = Platt()

    def to_dict(self) -> dict:
        return {"d": self.d.to_list(), "m": self.m.to_list()}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Calibration":
        if not data:
            return cls()
        try:
            return cls(Platt(*(float(v) for v in data["d"])), Platt(*(float(v) for v in data["m"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed calibration {data!r} ({e}); expected {{'d': [a, b], 'm': [a, b]}}") from e


def apply_calibration(comp, calibration: Calibration):
    """The components with D and M replaced by their calibrated values (box scores untouched)."""
    if calibration.d.is_identity and calibration.m.is_identity:
        return comp
    return dataclasses.replace(comp, slice_d=calibration.d(comp.slice_d), series_m=calibration.m(comp.series_m))
