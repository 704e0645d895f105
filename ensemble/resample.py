"""1-D resampling matrices: an image is resized as two small matrix products, ``Ry @ img @ Rx.T``.

Coordinates follow the pixel-edge convention used for boxes everywhere in the project: source
pixel ``j`` covers ``[j, j + 1)``, and a resize by ``scale`` maps a source coordinate ``x`` to
``x * scale``. A box resized with the image therefore only needs multiplying by ``scale``.

* Shrinking (scale < 1) averages the source area each output pixel covers, so a downscaled
  MR slice does not alias its noise into stripes.
* Enlarging (scale >= 1) interpolates bilinearly at the output pixel centres.

Both matrices are float32 with rows summing to 1 (a constant image stays constant).
"""

from __future__ import annotations

import numpy as np


def bilinear_matrix(start: float, stop: float, n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix sampling the source span [start, stop) at n_out pixel centres.

    Output pixel i samples the source at ``start + (i + 0.5) * (stop - start) / n_out - 0.5``
    (in pixel-index units), clamped to the first/last source pixel.
    """
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


def area_matrix(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix averaging the source interval ``[i / scale, (i + 1) / scale)`` per output pixel.

    ``scale`` (output pixels per source pixel, <= 1) defaults to ``n_out / n_in``. The part of an
    interval beyond the last source pixel is ignored, so the weights of every row sum to 1.
    """
    scale = n_out / n_in if scale is None else scale
    if not 0 < scale <= 1:
        raise ValueError(f"area averaging shrinks: scale must be in (0, 1], got {scale}")
    edges = np.arange(n_out + 1) / scale  # output pixel boundaries in source pixels
    start, stop = edges[:-1, None], np.minimum(edges[1:, None], n_in)  # (n_out, 1)
    j = np.arange(n_in)[None, :]  # (1, n_in)
    overlap = np.clip(np.minimum(stop, j + 1) - np.maximum(start, j), 0, None)  # (n_out, n_in)
    total = overlap.sum(axis=1, keepdims=True)
    empty = total[:, 0] == 0  # only when n_out exceeds n_in * scale by a whole pixel
    overlap[empty, n_in - 1], total[empty] = 1.0, 1.0
    return (overlap / total).astype(np.float32)


def resample_matrix(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in): area averaging when shrinking, bilinear when enlarging or keeping the size.

    ``scale`` (output pixels per source pixel) defaults to ``n_out / n_in``; pass it when n_out
    was rounded from ``n_in * scale`` so that both axes of an image share one exact scale.
    """
    scale = n_out / n_in if scale is None else scale
    if scale < 1:
        return area_matrix(n_in, n_out, scale)
    return bilinear_matrix(0.0, n_out / scale, n_out, n_in)


def resize_stack(pixels: np.ndarray, out_rows: int, out_cols: int, scale: float) -> np.ndarray:
    """Resize every slice of a stack by ``scale`` into an (n, out_rows, out_cols) float32 array.

    pixels (n, rows, cols), any real dtype. ``out_rows``/``out_cols`` are normally
    ``round(rows * scale)``/``round(cols * scale)``; the mapping is exactly ``x -> x * scale``
    on both axes whatever the rounding. When nothing changes size (scale 1, the usual 256 x 256
    MR slice at the small profile's 256 px) both matrices are the identity and the products are
    skipped: the result is the float32 stack itself (not a copy), the same values the products
    give, at no cost.
    """
    _, rows, cols = pixels.shape
    stack = pixels.astype(np.float32, copy=False)
    if scale == 1 and (out_rows, out_cols) == (rows, cols):
        return stack
    ry = resample_matrix(rows, out_rows, scale)  # (out_rows, rows)
    rx = resample_matrix(cols, out_cols, scale)  # (out_cols, cols)
    return np.matmul(np.matmul(ry, stack), rx.T)  # (n, out_rows, out_cols)
