"""The crop step: one 3D clip per series from its largest detected region.

Paper, "Sequence classification model": the largest detected tumour region of the series is
taken at the same size and place on N consecutive slices, rescaled to 112 x 112 x N, and the
slices are repeated when the series is shorter than N. Training builds its clips with the same
functions from the labelled boxes, so serving and training cannot drift apart.

Coordinates are detector-input pixels (x1, y1, x2, y2), as produced by the detector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wff.config import ClassifierConfig
from wff.ensemble.resample import bilinear_matrix


@dataclass(frozen=True)
class Region:
    centre: int  # series-local slice index the clip is centred on
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in detector pixels
    source: str  # "detected" | "low_score" | "default" (no box at all in the series)


def largest_region(boxes: np.ndarray, scores: np.ndarray, counts: np.ndarray, threshold: float, image_size: int) -> Region:
    """Largest box (by area) among the detections of one series with score >= threshold.

    boxes (n, K, 4), scores (n, K), counts (n,) for the n slices of the series. Without any
    box above threshold the best-scoring box of the series is used ("low_score"); without any
    box at all, a centred square of half the image ("default"), so a clip always exists.
    """
    n, k = scores.shape
    valid = np.arange(k)[None, :] < counts.reshape(n, 1)  # (n, K) not padding
    if not valid.any():
        q = image_size / 4
        return Region(n // 2, (q, q, 3 * q, 3 * q), "default")
    confident = valid & (scores >= threshold)
    if confident.any():
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (n, K)
        s, j = np.unravel_index(np.argmax(np.where(confident, area, -np.inf)), area.shape)
        source = "detected"
    else:
        s, j = np.unravel_index(np.argmax(np.where(valid, scores, -np.inf)), scores.shape)
        source = "low_score"
    return Region(int(s), tuple(float(v) for v in boxes[s, j]), source)


def clip_indices(n_slices: int, centre: int, clip_len: int) -> np.ndarray:
    """Slice indices of an N-slice clip centred on ``centre``, in series order.

    A series of at least N slices gives N consecutive slices, the window shifted inside the
    series when the centre is near an end. A shorter series repeats its slices in order
    (0, 0, 1, 1, 2, ...) so the clip keeps the anatomy's order along the normal.
    """
    if n_slices < 1:
        raise ValueError(f"a series needs at least one slice, got {n_slices}")
    if clip_len < 1:
        raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    if n_slices >= clip_len:
        start = int(np.clip(centre - clip_len // 2, 0, n_slices - clip_len))
        return np.arange(start, start + clip_len)
    return (np.arange(clip_len) * n_slices) // clip_len


def expand_box(box: tuple[float, float, float, float], margin: float, image_size: int) -> tuple[float, float, float, float]:
    """Grow a box by ``margin`` of its width/height on each side, clipped to the image; at least 2 px wide."""
    x1, y1, x2, y2 = box
    w, h = max(x2 - x1, 2.0), max(y2 - y1, 2.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = w * (1 + 2 * margin), h * (1 + 2 * margin)
    x1, x2 = np.clip([cx - w / 2, cx + w / 2], 0, image_size)
    y1, y2 = np.clip([cy - h / 2, cy + h / 2], 0, image_size)
    return float(x1), float(y1), float(max(x2, x1 + 1)), float(max(y2, y1 + 1))


def crop_clip(slices: np.ndarray, box: tuple[float, float, float, float], indices: np.ndarray, out_size: int) -> np.ndarray:
    """Crop ``box`` from ``slices[indices]`` and resize bilinearly to out_size x out_size.

    slices (n, H, W) float32 -> clip (len(indices), out_size, out_size) float32.
    """
    _, height, width = slices.shape
    x1, y1, x2, y2 = box
    ry = bilinear_matrix(y1, y2, out_size, height)  # (C, H)
    rx = bilinear_matrix(x1, x2, out_size, width)  # (C, W)
    picked = slices[indices].astype(np.float32, copy=False)  # (N, H, W)
    return np.einsum("ch,nhw,dw->ncd", ry, picked, rx, optimize=True).astype(np.float32)


def crop_patient(
    slices: np.ndarray,
    slice_series: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    counts: np.ndarray,
    cfg: ClassifierConfig,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, list[Region]]:
    """All series of one patient -> classifier clips.

    slices (S, 1, H, W) float32, slice_series (S,) int32 with series 0..Q-1 in order,
    boxes (S, K, 4), scores (S, K), counts (S,) or (S, 1).
    Returns clips (Q, 1, N, C, C) float32, regions (Q, 5) float32 rows
    (centre slice, x1, y1, x2, y2), and the Region of each series.
    """
    if slices.ndim != 4 or slices.shape[1] != 1:
        raise ValueError(f"slices must be (S, 1, H, W), got {slices.shape}")
    counts = counts.reshape(-1)
    image_size = slices.shape[-1]
    n_series = int(slice_series.max()) + 1 if slice_series.size else 0
    clips = np.empty((n_series, 1, cfg.clip_len, cfg.crop_size, cfg.crop_size), np.float32)
    rows = np.empty((n_series, 5), np.float32)
    regions = []
    for q in range(n_series):
        members = np.flatnonzero(slice_series == q)  # (n,) global slice indices, in series order
        if members.size == 0:
            raise ValueError(f"series {q} has no slices; slice_series must number series 0..{n_series - 1}")
        region = largest_region(boxes[members], scores[members], counts[members], threshold, image_size)
        box = expand_box(region.box, cfg.crop_margin, image_size)
        idx = clip_indices(members.size, region.centre, cfg.clip_len)
        clips[q, 0] = crop_clip(slices[members, 0], box, idx, cfg.crop_size)
        rows[q] = (region.centre, *region.box)
        regions.append(region)
    return clips, rows, regions
