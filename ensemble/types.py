"""Data types passed between the pure steps (DICOM reading, preprocessing, training data).

Array contracts are in the field comments: shape, dtype, value range, coordinate frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class InputError(ValueError):
    """A request or dataset file is unusable. The message names the file (its name in the
    request, never patient identifiers) and the field, and says what to do. Serving turns it
    into an INVALID_ARGUMENT response for that request only."""


@dataclass(frozen=True)
class Series:
    """One selected sagittal series, slices ordered along the slice normal."""

    sequence: str  # "T1" | "T2" | "STIR" (STIR covers fat-suppressed T2)
    description: str  # SeriesDescription as written by the scanner
    series_number: int | None  # (0020,0011)
    pixels: np.ndarray  # (n, rows, cols) float32, modality LUT applied (rescale slope/intercept)
    pixel_spacing: tuple[float, float]  # (row, col) spacing in mm
    positions: np.ndarray  # (n,) float64, ImagePositionPatient projected on the normal, ascending
    files: tuple[str, ...]  # request/file name of each slice, same order as pixels
    sequence_source: str = ""  # the rule that decided the sequence, e.g. "SeriesDescription 'T2 SAG'"


@dataclass(frozen=True)
class Study:
    """Everything usable from one patient's DICOM files."""

    series: tuple[Series, ...]  # selected sagittal series, ordered by series number then description
    skipped: tuple[dict, ...] = ()  # {"series_number", "description", "reason", "files", "first_file"} per skipped series
    patient_age: float | None = None  # from (0010,1010) PatientAge, in years; None if absent


@dataclass(frozen=True)
class PreparedPatient:
    """Detector-ready slices of one patient: the output of the preprocess step."""

    slices: np.ndarray  # (S_total, 1, size, size) float32 in [0, 1], series after series
    slice_series: np.ndarray  # (S_total,) int32, index into series_info of each slice
    scales: tuple[float, ...]  # per series: detector pixels per source pixel (letterbox, top-left anchored)
    series_info: tuple[dict, ...]  # per series: {"index", "sequence", "sequence_source", "description", "series_number",
    #                                "n_slices", "rows", "cols", "pixel_spacing"}; no identifiers


@dataclass(frozen=True)
class PatientRecord:
    """One row of a dataset's labels.csv."""

    patient_id: str
    label: int  # 0 benign, 1 malignant (pathology-confirmed)
    age: float  # years
    locations: tuple[str, ...]  # vertebral locations of the tumours, each of config.LOCATIONS, main one first, no repeats
    split: str  # "train" | "test"
    path: Path  # the patient's folder


@dataclass(frozen=True)
class AnnotatedPatient:
    """A prepared patient plus its LabelMe rectangles, mapped into detector pixels."""

    record: PatientRecord
    prepared: PreparedPatient
    boxes: tuple[np.ndarray, ...] = field(default=())  # per slice: (m, 4) float32 x1, y1, x2, y2; (0, 4) if none
