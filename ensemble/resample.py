"""1-D resampling matrices: image resizing as two small matrix products.

``resample_matrix(n_in, n_out)`` is (n_out, n_in): bilinear interpolation at the output pixel
centres when enlarging, area averaging (each output pixel the mean of the input it covers)
when shrinking, so downscaled MR slices do not alias.
"""

from __future__ import annotations

import numpy as np


def bilinear_matrix(start: float, stop: float, n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix sampling the span [start, stop) of a 1-D signal at n_out pixel centres."""
    centres = start + (np.arange(n_out) + 0.5) * (stop - start) / n_out - 0.5
    centres = np.clip(centres, 0, n_in - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (centres - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix averaging the input interval each output pixel covers (n_out <= n_in)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)  # output pixel boundaries in input pixels
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        a, b = edges[i], edges[i + 1]
        for j in range(int(np.floor(a)), min(int(np.ceil(b)), n_in)):
            m[i, j] = min(b, j + 1) - max(a, j)
    return m / m.sum(axis=1, keepdims=True)


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Area averaging when shrinking, bilinear when enlarging or keeping the size."""
    if n_out < n_in:
        return area_matrix(n_in, n_out)
    return bilinear_matrix(0.0, float(n_in), n_out, n_in)
