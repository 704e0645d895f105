"""The project's own Prometheus counters, reported by the Python-backend steps next to Triton's.

Triton exposes them on its metrics endpoint (``wff metrics`` prints them):

* ``wff_rejected_inputs_total{model, reason}``: requests a step answered INVALID_ARG, by reason;
* ``wff_diagnoses_total{diagnosis}``: diagnoses the fusion step returned, by class.

Reasons are coarse categories read from the rejection message (the messages of
wff.ensemble name the problem first); they never carry file names or patient identifiers, so
the label set stays small and free of PHI.
"""

from __future__ import annotations

import re

COUNTERS = {
    "wff_rejected_inputs_total": "Requests rejected as bad input (INVALID_ARG), by step and reason",
    "wff_diagnoses_total": "Diagnoses returned by the fusion step, by class",
}

# (pattern searched in the rejection message, reason label); the first match wins
REJECTION_REASONS: tuple[tuple[str, str], ...] = (
    (r"no usable sagittal", "no_usable_series"),  # first: it quotes the skipped series' own reasons
    (r"not a DICOM file", "not_dicom"),
    (r"unreadable DICOM", "unreadable_dicom"),
    (r"pixel data cannot be decoded", "undecodable_pixels"),
    (r"without pixel data|only a DICOMDIR|no image files", "no_image"),
    (r"expected grey-level", "unsupported_pixels"),
    (r"exceed the limit", "over_limit"),
    (r"different PatientID", "several_patients"),
    (r"ImagePositionPatient", "unordered_slices"),
    (r"AGE_YEARS|PatientAge", "bad_age"),
    (r"no DICOM files|DICOM_FILES must", "no_files"),
    (r"rows for|must index|shape|dtype", "inconsistent_tensors"),
)
OTHER_REASON = "other"
_COMPILED = tuple((re.compile(p), reason) for p, reason in REJECTION_REASONS)


def rejection_reason(message: str) -> str:
    """The reason label of a rejection message (``other`` when no pattern matches)."""
    for pattern, reason in _COMPILED:
        if pattern.search(message):
            return reason
    return OTHER_REASON
