"""A patient's diagnosis as returned by the ensemble, parsed from its output tensors.

Both the gRPC client (from the server's outputs) and the in-process pipeline (from the same
step functions) build it from a dict keyed by the ensemble's output names, so the two paths
are compared field by field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from wff.ensemble.fusion import Components


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Diagnosis:
    label: str  # "benign" | "malignant"
    p_malignant: float
    series_votes: np.ndarray  # (Q,) int32: 1 malignant, 0 benign, -1 abstained
    series_m: np.ndarray  # (Q,) float32 sequence classifier P(malignant)
    series_info: tuple[dict, ...]  # per series: sequence, description, slices ...
    series_regions: np.ndarray  # (Q, 5) centre slice, x1, y1, x2, y2 (detector pixels)
    slice_d: np.ndarray  # (S,) float32; NaN = no box
    slice_score: np.ndarray  # (S,)
    slice_box: np.ndarray  # (S, 4)
    slice_series: np.ndarray  # (S,) int32
    age_a: float  # NaN = no age term
    age_used: float  # NaN = no age known
    notes: dict

    @classmethod
    def from_outputs(cls, out: Mapping[str, np.ndarray]) -> "Diagnosis":
        """Build from ensemble outputs keyed DIAGNOSIS, P_MALIGNANT, ... (see wff.contracts)."""
        return cls(
            label=_text(np.asarray(out["DIAGNOSIS"]).reshape(-1)[0]),
            p_malignant=float(np.asarray(out["P_MALIGNANT"]).reshape(-1)[0]),
            series_votes=np.asarray(out["SERIES_VOTES"], np.int32).reshape(-1),
            series_m=np.asarray(out["SERIES_M"], np.float32).reshape(-1),
            series_info=tuple(json.loads(_text(v)) for v in np.asarray(out["SERIES_INFO"]).reshape(-1)),
            series_regions=np.asarray(out["SERIES_REGIONS"], np.float32).reshape(-1, 5),
            slice_d=np.asarray(out["SLICE_D"], np.float32).reshape(-1),
            slice_score=np.asarray(out["SLICE_SCORE"], np.float32).reshape(-1),
            slice_box=np.asarray(out["SLICE_BOX"], np.float32).reshape(-1, 4),
            slice_series=np.asarray(out["SLICE_SERIES"], np.int32).reshape(-1),
            age_a=float(np.asarray(out["AGE_A"]).reshape(-1)[0]),
            age_used=float(np.asarray(out["AGE_USED"]).reshape(-1)[0]),
            notes=json.loads(_text(np.asarray(out["NOTES"]).reshape(-1)[0])),
        )

    def components(self) -> Components:
        return Components(self.slice_d, self.slice_score, self.slice_series, self.series_m, self.age_a)

    def to_dict(self) -> dict:
        """JSON-ready summary (no pixel data, no identifiers)."""

        def num(v: float):
            return None if math.isnan(v) else round(float(v), 6)

        return {
            "diagnosis": self.label,
            "p_malignant": num(self.p_malignant),
            "age_used": num(self.age_used),
            "age_term": num(self.age_a),
            "series": [
                {**info, "vote": int(v), "m": num(m), "region": [round(float(x), 2) for x in r]}
                for info, v, m, r in zip(self.series_info, self.series_votes, self.series_m, self.series_regions)
            ],
            "components": self.components().to_dict(),
            "notes": self.notes,
        }
