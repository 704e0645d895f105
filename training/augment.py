"""MultiScale-SelfCutMix for the detector (paper, "Detection model"; its ref. [11]).

A labelled tumour region of a slice is copied, its width and height scaled by factors drawn
from ``detector.cutmix_scale`` (0.5 .. 1), and pasted elsewhere on the *same* slice near the
spine; the pasted region becomes an extra box with the same label. Spinal tumours sit on the
spinal column, which runs roughly vertically on sagittal slices, so "near the spine" is read
as: along the column of the source box, one to ``MAX_SHIFT`` source-box heights above or
below it (centre to centre), with a small horizontal jitter, inside the image content and
overlapping no existing box by more than ``MAX_OVERLAP`` of the pasted area.

Pure torch; every random draw comes from the ``torch.Generator`` passed in, so a seed gives
the same augmentation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_SHIFT, MAX_SHIFT = 1.0, 3.0  # vertical offset, in source-box heights (centre to centre)
MAX_JITTER = 0.25  # horizontal offset, fraction of the source-box width either way
MAX_OVERLAP = 0.1  # largest intersection with any existing box, fraction of the pasted area
TRIES = 10  # placements tried before giving up (the slice is then returned unchanged)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def self_cutmix(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    generator: torch.Generator,
    prob: float,
    scale: tuple[float, float],
    bounds: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paste a rescaled copy of one labelled tumour along the spine of the same slice.

    image (C, H, W) float32; boxes (m, 4) float32 x1 y1 x2 y2 in pixels; labels (m,) int64.
    ``bounds`` = (height, width) of the image content (the letterbox puts it top-left);
    defaults to the whole image. With probability ``prob`` (and a placement found) returns
    a new image and ``m + 1`` boxes/labels, the last being the pasted copy; otherwise the
    inputs themselves. A slice without boxes is returned unchanged.
    """
    if boxes.numel() == 0 or float(torch.rand((), generator=generator)) >= prob:
        return image, boxes, labels
    _, height, width = image.shape
    bound_h, bound_w = bounds if bounds is not None else (height, width)
    bound_h, bound_w = min(bound_h, height), min(bound_w, width)

    j = int(torch.randint(len(boxes), (), generator=generator))
    x1, y1, x2, y2 = (float(v) for v in boxes[j])
    # Whole-pixel source region around the (sub-pixel) labelled box.
    px1, py1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    px2, py2 = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    pw, ph = px2 - px1, py2 - py1
    if pw < 2 or ph < 2:
        return image, boxes, labels
    nw = max(1, round(pw * _uniform(generator, *scale)))
    nh = max(1, round(ph * _uniform(generator, *scale)))

    placed = None
    for _ in range(TRIES):
        shift = _uniform(generator, MIN_SHIFT, MAX_SHIFT) * ph * (1 if float(torch.rand((), generator=generator)) < 0.5 else -1)
        jitter = _uniform(generator, -MAX_JITTER, MAX_JITTER) * pw
        nx = round((px1 + px2) / 2 + jitter - nw / 2)
        ny = round((py1 + py2) / 2 + shift - nh / 2)
        if nx < 0 or ny < 0 or nx + nw > bound_w or ny + nh > bound_h:
            continue
        candidate = torch.tensor([nx, ny, nx + nw, ny + nh], dtype=boxes.dtype)
        if _max_overlap(candidate, boxes) <= MAX_OVERLAP:
            placed = (nx, ny)
            break
    if placed is None:
        return image, boxes, labels

    nx, ny = placed
    patch = image[:, py1:py2, px1:px2].unsqueeze(0)  # (1, C, ph, pw)
    patch = F.interpolate(patch, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    out = image.clone()
    out[:, ny : ny + nh, nx : nx + nw] = patch
    sx, sy = nw / pw, nh / ph
    # The labelled box keeps its place inside the scaled patch.
    new_box = torch.tensor(
        [[nx + (x1 - px1) * sx, ny + (y1 - py1) * sy, nx + (x2 - px1) * sx, ny + (y2 - py1) * sy]], dtype=boxes.dtype
    )
    return out, torch.cat([boxes, new_box]), torch.cat([labels, labels[j : j + 1]])


def _max_overlap(candidate: Tensor, boxes: Tensor) -> float:
    """Largest intersection of ``candidate`` (4,) with ``boxes`` (m, 4), over the candidate's area."""
    lt = torch.maximum(boxes[:, :2], candidate[:2])
    rb = torch.minimum(boxes[:, 2:], candidate[2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)  # (m,)
    area = (candidate[2] - candidate[0]) * (candidate[3] - candidate[1])
    return float(inter.max() / area)


__all__ = ["self_cutmix", "MIN_SHIFT", "MAX_SHIFT", "MAX_JITTER", "MAX_OVERLAP"]
