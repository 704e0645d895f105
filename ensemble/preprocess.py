"""The preprocess step after DICOM reading: per-series intensity window and letterbox.

Training builds its inputs with these same functions (wff.training.dataset), so the detector
sees identical pixels in training and in serving.

Letterbox geometry: the slice is scaled by ``scale = size / max(rows, cols)`` (keeping the
aspect ratio), placed at the top-left corner and padded with zeros at the bottom/right. A
source point (x, y) in pixels lands at (x * scale, y * scale) in the detector input, and a
detector box maps back by dividing by ``scale``; no offset is involved.
"""

from __future__ import annotations

import numpy as np

from wff.config import ImageConfig
from wff.ensemble.resample import resize_stack
from wff.ensemble.types import PreparedPatient, Series, Study


def normalize_intensity(pixels: np.ndarray, image_cfg: ImageConfig) -> np.ndarray:
    """Per-series window: the ``image_cfg.clip_low``..``clip_high`` percentiles map to 0..1, clipped.

    pixels (n, rows, cols), any real dtype (modality values) -> float32 (n, rows, cols) in
    [0, 1]. The percentiles are taken over the whole series, so slices keep their relative
    brightness. A constant series maps to 0.
    """
    if pixels.size == 0:
        raise ValueError(f"cannot normalise an empty series of shape {pixels.shape}")
    lo, hi = np.percentile(pixels, [image_cfg.clip_low, image_cfg.clip_high])
    if not hi > lo:
        return np.zeros(pixels.shape, np.float32)
    out = (pixels.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def letterbox(pixels: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Scale the longer side to ``size`` keeping the aspect ratio; top-left anchored, zero padded.

    pixels (n, rows, cols) float32 -> ((n, size, size) float32, scale), scale = detector pixels
    per source pixel. Shrinking averages areas, enlarging interpolates bilinearly
    (wff.ensemble.resample), as two small matrix products per slice.
    """
    if pixels.ndim != 3 or 0 in pixels.shape:
        raise ValueError(f"letterbox expects a non-empty (n, rows, cols) stack, got shape {pixels.shape}")
    n, rows, cols = pixels.shape
    scale = size / max(rows, cols)
    out_rows = min(size, max(1, round(rows * scale)))
    out_cols = min(size, max(1, round(cols * scale)))
    out = np.zeros((n, size, size), np.float32)
    out[:, :out_rows, :out_cols] = resize_stack(pixels, out_rows, out_cols, scale)
    return out, scale


def series_info(index: int, series: Series) -> dict:
    """The description of one prepared series that travels with its slices (no identifiers)."""
    n, rows, cols = series.pixels.shape
    return {
        "index": index,
        "sequence": series.sequence,
        "sequence_source": series.sequence_source,
        "description": series.description,
        "series_number": series.series_number,
        "n_slices": int(n),
        "rows": int(rows),
        "cols": int(cols),
        "pixel_spacing": [float(v) for v in series.pixel_spacing],
    }


def prepare_patient(study: Study, image_cfg: ImageConfig) -> PreparedPatient:
    """All selected series of a study -> detector-ready slices, series after series.

    Returns slices (S_total, 1, size, size) float32 in [0, 1], slice_series (S_total,) int32,
    one letterbox scale and one info dict per series (see wff.ensemble.types.PreparedPatient).
    """
    if not study.series:
        raise ValueError("the study has no selected series to prepare")
    slices, owners, scales, info = [], [], [], []
    for q, series in enumerate(study.series):
        boxed, scale = letterbox(normalize_intensity(series.pixels, image_cfg), image_cfg.size)
        slices.append(boxed[:, None])  # (n, 1, size, size)
        owners.append(np.full(len(boxed), q, np.int32))
        scales.append(scale)
        info.append(series_info(q, series))
    return PreparedPatient(np.concatenate(slices), np.concatenate(owners), tuple(scales), tuple(info))
