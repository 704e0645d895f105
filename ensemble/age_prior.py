"""The age module: P(malignant | age group) from training-set statistics (paper, Fig. 5).

Ages are grouped by ``AgePriorConfig.edges`` (lower bounds in years; the last group is open).
A group with at least ``min_patients`` training patients takes its raw rate,
malignant_g / patients_g, the statistic of the paper's Fig. 5. A sparser group (every group
when ``min_patients`` is None) is smoothed towards the overall training rate with ``alpha``
pseudo-counts, so a group with few patients does not jump to 0 or 1::

    A(g) = (malignant_g + alpha * overall) / (patients_g + alpha)

With ``balanced`` the training set's class mix is divided out by Bayes' rule:
odds(A_bal(g)) = odds(A(g)) / odds(overall), i.e. P(malignant | age group) for equal class
priors. The paper's training set is 60 % malignant but its test set 36 %; the ``small``
profile keeps every WFF term on the same equal-prior footing (the networks are trained
class-balanced), so the "larger probability" decision of Eq. 1 does not inherit the training
set's class mix; the ``paper`` profile uses the raw statistic, as the paper does.

:meth:`AgePrior.plot` draws the module as Fig. 5: P(benign) and P(malignant) per age group,
with the patients of each group.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wff.config import AgePriorConfig


def check_age(age: float, max_age: float) -> float:
    """A usable age in years, or ValueError saying what range is accepted."""
    age = float(age)
    if math.isnan(age) or not 0 <= age <= max_age:
        raise ValueError(f"age {age!r} is out of range; give years in [0, {max_age:g}] or omit it")
    return age


@dataclass(frozen=True)
class AgePrior:
    edges: tuple[float, ...]  # group lower bounds, ascending, first 0
    p_malignant: tuple[float, ...]  # smoothed P(malignant) per group (equal-prior when fitted balanced)
    patients: tuple[int, ...]  # training patients per group
    malignant: tuple[int, ...]  # of which malignant
    alpha: float
    overall: float  # training-set malignancy rate
    max_age: float
    min_patients: int | None = None  # groups with fewer patients were smoothed (None: every group)
    balanced: bool | None = None  # fitted for equal class priors (None: not recorded, files written before)

    @classmethod
    def fit(cls, ages: np.ndarray, labels: np.ndarray, cfg: AgePriorConfig) -> "AgePrior":
        ages = np.asarray(ages, np.float64)
        labels = np.asarray(labels, np.int64)
        if ages.shape != labels.shape:
            raise ValueError(f"need one label per age, got {ages.shape} ages and {labels.shape} labels")
        known = ~np.isnan(ages)  # patients of unknown age do not inform the age groups
        ages, labels = ages[known], labels[known]
        if ages.size == 0:
            raise ValueError("no training patient has a known age; the age prior needs some")
        for a in ages:
            check_age(a, cfg.max_age)
        edges = np.asarray(cfg.edges, np.float64)
        group = np.searchsorted(edges, ages, side="right") - 1  # (n,) group of each patient
        patients = np.bincount(group, minlength=len(edges))
        malignant = np.bincount(group, weights=labels, minlength=len(edges)).astype(np.int64)
        overall = float(labels.mean())
        p = (malignant + cfg.alpha * overall) / (patients + cfg.alpha)
        if cfg.min_patients is not None:
            dense = patients >= cfg.min_patients
            p[dense] = malignant[dense] / patients[dense]
        if cfg.balanced and 0 < overall < 1:
            odds = p / (1 - p) * (1 - overall) / overall
            p = odds / (1 + odds)
        return cls(
            tuple(float(e) for e in edges),
            tuple(float(v) for v in p),
            tuple(int(v) for v in patients),
            tuple(int(v) for v in malignant),
            float(cfg.alpha),
            overall,
            float(cfg.max_age),
            cfg.min_patients,
            bool(cfg.balanced),
        )

    def smoothed(self) -> tuple[bool, ...]:
        """Per group: was its rate smoothed towards the overall rate (fewer than ``min_patients`` patients)."""
        return tuple(self.min_patients is None or n < self.min_patients for n in self.patients)

    def group_names(self) -> list[str]:
        """Printable age groups: "0-10", "10-20", ..., "80+"."""
        bounds = [f"{e:g}" for e in self.edges]
        return [f"{lo}-{hi}" for lo, hi in zip(bounds, bounds[1:])] + [f"{bounds[-1]}+"]

    def plot(self, path: str | Path) -> Path:
        """The age module as the paper's Fig. 5: P(benign) and P(malignant) per age group, as a PNG.

        Each group is labelled with its training patients; a smoothed group is starred.
        """
        from matplotlib.figure import Figure  # lazy: matplotlib only when the figure is drawn

        fig = Figure(figsize=(8, 4), dpi=120, layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(self.edges))
        p = np.asarray(self.p_malignant)
        for shift, values, name, colour in ((-0.2, 1 - p, "P(benign)", "tab:blue"), (0.2, p, "P(malignant)", "tab:red")):
            bars = ax.bar(x + shift, values, 0.4, label=name, color=colour)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
        ticks = [f"{g}\nn={n}{'*' if s else ''}" for g, n, s in zip(self.group_names(), self.patients, self.smoothed())]
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlabel("age group (years); n = training patients")
        ax.set_ylabel("probability")
        ax.set_ylim(0, 1.25)  # room for the legend above the bars
        ax.legend(loc="upper center", ncols=2, fontsize=8)
        footing = {True: "equal class priors", False: "training class mix"}.get(self.balanced, "class footing not recorded")
        note = "every group" if self.min_patients is None else f"groups under {self.min_patients} patients"
        ax.set_title(
            f"Age module (paper Fig. 5): {sum(self.patients)} training patients, {footing}\n"
            f"* smoothed towards the overall rate {self.overall:.2f} (alpha {self.alpha:g}; {note})",
            fontsize=9,
        )
        path = Path(path)
        fig.savefig(path)
        return path

    def group(self, age: float) -> int:
        return int(np.searchsorted(self.edges, check_age(age, self.max_age), side="right") - 1)

    def __call__(self, age: float) -> float:
        """A = P(malignant | age); NaN age -> NaN (no age term)."""
        if age is None or (isinstance(age, float) and math.isnan(age)):
            return float("nan")
        return self.p_malignant[self.group(age)]

    def to_dict(self) -> dict:
        return {
            "edges": list(self.edges),
            "p_malignant": list(self.p_malignant),
            "patients": list(self.patients),
            "malignant": list(self.malignant),
            "alpha": self.alpha,
            "overall": self.overall,
            "max_age": self.max_age,
            "min_patients": self.min_patients,
            "balanced": self.balanced,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AgePrior":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            prior = cls(
                tuple(data["edges"]),
                tuple(data["p_malignant"]),
                tuple(data["patients"]),
                tuple(data["malignant"]),
                float(data["alpha"]),
                float(data["overall"]),
                float(data["max_age"]),
                data.get("min_patients"),  # absent from files written before: every group was smoothed
                data.get("balanced"),
            )
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid age prior ({e}); rebuild it with wff train") from e
        if len(prior.edges) != len(prior.p_malignant):
            raise ValueError(f"{path}: {len(prior.edges)} age groups but {len(prior.p_malignant)} probabilities")
        return prior
