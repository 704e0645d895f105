"""The preprocess step after DICOM reading: intensity window and letterbox to the detector size.

Training builds its inputs with these same functions (wff.training.dataset), so the detector
sees identical pixels in training and in serving.
"""

from __future__ import annotations

import numpy as np

from wff.config import ImageConfig
from wff.ensemble.resample import resample_matrix
from wff.ensemble.types import PreparedPatient, Study


def normalize_intensity(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """Per-series window: the clip_low..clip_high percentiles map to 0..1, clipped.

    pixels (n, rows, cols) any real dtype -> float32 in [0, 1]. A constant series maps to 0.
    """
    lo, hi = np.percentile(pixels, [cfg.clip_low, cfg.clip_high])
    if hi <= lo:
        return np.zeros(pixels.shape, np.float32)
    return np.clip((pixels.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def letterbox(pixels: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio so the longer side is ``size``; pad bottom/right with 0.

    pixels (n, rows, cols) float32 -> ((n, size, size) float32, scale), scale = output pixels
    per source pixel, so a source point (x, y) lands at (x * scale, y * scale).
    """
    n, rows, cols = pixels.shape
    scale = size / max(rows, cols)
    out_rows, out_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    ry = resample_matrix(rows, out_rows)  # (out_rows, rows)
    rx = resample_matrix(cols, out_cols)  # (out_cols, cols)
    out = np.zeros((n, size, size), np.float32)
    out[:, :out_rows, :out_cols] = np.einsum("ar,nrc,bc->nab", ry, pixels.astype(np.float32), rx, optimize=True)
    return out, scale


def prepare_patient(study: Study, cfg: ImageConfig) -> PreparedPatient:
    """All selected series of a study -> detector-ready slices, series after series."""
    slices, series_index, scales, info = [], [], [], []
    for q, series in enumerate(study.series):
        boxed, scale = letterbox(normalize_intensity(series.pixels, cfg), cfg.size)
        slices.append(boxed[:, None])  # (n, 1, size, size)
        series_index.append(np.full(len(boxed), q, np.int32))
        scales.append(scale)
        info.append(
            {
                "index": q,
                "sequence": series.sequence,
                "description": series.description,
                "series_number": series.series_number,
                "n_slices": int(series.pixels.shape[0]),
                "rows": int(series.pixels.shape[1]),
                "cols": int(series.pixels.shape[2]),
                "pixel_spacing": [float(v) for v in series.pixel_spacing],
            }
        )
    return PreparedPatient(np.concatenate(slices), np.concatenate(series_index), tuple(scales), tuple(info))
