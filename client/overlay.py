"""Fig. 4-style overlays: the served best box of each slice, its class and probability, on the detector input.

The client decodes the patient's files itself with the preprocess step's own code
(:func:`wff.ensemble.steps.preprocess`: DICOM reading, series selection, per-series intensity
window, letterbox), so each picture is exactly the detector's input and the served boxes
(SLICE_BOX, x1, y1, x2, y2 in detector pixels of the letterboxed, top-left anchored image) land
where the detector put them. The local decoding is checked against the served SERIES_INFO and
SLICE_SERIES, and refused when they differ.

One PNG per series: a header line (sequence, slices, vote, M), then a grid of the series'
voting slices (best box score >= the fusion's det_threshold; else the best-scoring boxed
slices), each with its box in green (benign) or red (malignant) as in the paper's Fig. 4, the
class and its probability (D for malignant, 1 - D for benign) and a caption with the slice
number and box score. Files are named ``<name>_s<series>_<sequence>.png``; nothing else that
could identify the patient is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wff.config import SMALL, ImageConfig
from wff.contracts import contracts_for
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import VOTE_THRESHOLD

BENIGN_RGB = (0, 200, 0)  # Fig. 4: green boxes for benign
MALIGNANT_RGB = (230, 0, 0)  # red boxes for malignant
TEXT_RGB = (255, 255, 255)
BACKGROUND_RGB = (24, 24, 24)
MAX_TILES = 12  # slices drawn per series at most (the highest box scores)
MIN_TILE_PX = 256  # small detector inputs are enlarged (nearest neighbour, integer zoom) to at least this
MAX_COLUMNS = 4
HEADER_PX = 30  # the series' header line
CAPTION_PX = 20  # above every tile: slice number and box score
GAP_PX = 6  # between tiles of a row
LINE_PX = 2  # box outline width
FONT_PX = 14
DETECTOR_MODEL = contracts_for(SMALL).detector.name
# The server enforced its own request limits; decoding here for display must not add others.
_NO_LIMITS = {"max_files": 2**31, "max_bytes": 2**62, "max_slices": 2**31, "max_pixels_per_slice": 2**62}


@dataclass(frozen=True)
class Layout:
    """Where each tile's image lies in an overlay PNG (pixels; tile k fills row k // columns)."""

    columns: int
    rows: int
    zoom: int  # PNG pixels per detector pixel
    image_px: int  # detector input size

    @property
    def tile_px(self) -> int:
        return self.image_px * self.zoom

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG."""
        return self.columns * (self.tile_px + GAP_PX) - GAP_PX, HEADER_PX + self.rows * (CAPTION_PX + self.tile_px)

    def origin(self, k: int) -> tuple[int, int]:
        """Top-left PNG pixel of tile k's image; detector pixel (x, y) lands at origin + (x, y) * zoom."""
        row, col = divmod(k, self.columns)
        return col * (self.tile_px + GAP_PX), HEADER_PX + row * (CAPTION_PX + self.tile_px) + CAPTION_PX


def layout_for(n_tiles: int, image_px: int) -> Layout:
    columns = max(1, min(n_tiles, MAX_COLUMNS))
    return Layout(columns, max(1, math.ceil(n_tiles / columns)), max(1, math.ceil(MIN_TILE_PX / image_px)), image_px)


def pick_slices(d: np.ndarray, scores: np.ndarray, det_threshold: float, max_tiles: int = MAX_TILES) -> np.ndarray:
    """Series-local indices of the slices to draw, ascending.

    d (n,) NaN where the slice has no box, scores (n,) its best box score. The voting slices
    (a box scoring >= det_threshold); without any, every boxed slice; without any box, the
    middle slice. At most ``max_tiles``, those with the highest scores.
    """
    has_box = ~np.isnan(d)
    chosen = np.flatnonzero(has_box & (scores >= det_threshold))
    if chosen.size == 0:
        chosen = np.flatnonzero(has_box)
    if chosen.size == 0:
        return np.array([len(d) // 2])
    best = chosen[np.argsort(-scores[chosen], kind="mergesort")[:max_tiles]]
    return np.sort(best)


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def box_class(d: float) -> tuple[str, float, tuple[int, int, int]]:
    """(class, its probability, colour) of a box with P(malignant) = d; d >= 0.5 is malignant, as the fusion votes."""
    if d >= VOTE_THRESHOLD:
        return "malignant", d, MALIGNANT_RGB
    return "benign", 1.0 - d, BENIGN_RGB


def render_series(
    images: np.ndarray,
    boxes: np.ndarray,
    d: np.ndarray,
    scores: np.ndarray,
    picked: Sequence[int],
    title: str,
    det_threshold: float,
):
    """One series' overlay as a PIL RGB image (layout: :func:`layout_for`).

    images (n, H, H) float32 in [0, 1]: the detector input of the series' slices; boxes (n, 4)
    x1, y1, x2, y2 in its pixels; d (n,) P(malignant) of the best box (NaN = none); scores (n,);
    picked: series-local indices of the slices drawn, in tile order.
    """
    from PIL import Image, ImageDraw

    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (n, H, H) detector inputs, got {images.shape}")
    layout = layout_for(len(picked), images.shape[-1])
    canvas = Image.new("RGB", layout.size, BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(FONT_PX), _font(FONT_PX - 2)
    draw.text((6, (HEADER_PX - FONT_PX) // 2), title, fill=TEXT_RGB, font=font)
    z, tile = layout.zoom, layout.tile_px
    for k, j in enumerate(picked):
        ox, oy = layout.origin(k)
        grey = np.round(np.clip(images[j], 0.0, 1.0) * 255).astype(np.uint8)
        grey = np.repeat(np.repeat(grey, z, axis=0), z, axis=1)  # (tile, tile) nearest-neighbour zoom
        canvas.paste(Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB"), (ox, oy))
        if math.isnan(d[j]):
            caption = f"slice {j + 1}/{len(images)}: no detection"
        else:
            caption = f"slice {j + 1}/{len(images)}  score {scores[j]:.2f}" + ("" if scores[j] >= det_threshold else "  (no vote)")
        draw.text((ox + 4, oy - CAPTION_PX + 3), caption, fill=TEXT_RGB, font=small)
        if math.isnan(d[j]):
            continue
        name, p, colour = box_class(float(d[j]))
        x1, y1, x2, y2 = (float(np.clip(v, 0, images.shape[-1])) * z for v in boxes[j])
        left, top = ox + round(x1), oy + round(y1)
        right, bottom = max(ox + round(x2) - 1, left + 1), max(oy + round(y2) - 1, top + 1)
        draw.rectangle((left, top, min(right, ox + tile - 1), min(bottom, oy + tile - 1)), outline=colour, width=LINE_PX)
        label = f"{name} {p:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=small)
        w, h = tx1 - tx0 + 6, ty1 - ty0 + 4
        lx = min(left, ox + tile - w)
        ly = top - h if top - h >= oy else top + LINE_PX  # above the box, or inside it at the top edge
        draw.rectangle((lx, ly, lx + w - 1, ly + h - 1), fill=colour)
        draw.text((lx + 3 - tx0, ly + 2 - ty0), label, fill=TEXT_RGB, font=small)
    return canvas


def detector_input(files: Sequence[tuple[str, bytes]], dx: Diagnosis, image_cfg: ImageConfig) -> np.ndarray:
    """The detector input slices (S, H, H) float32 of ``files``, decoded here as the server did.

    ValueError when the local decoding does not give the series and slices the server
    reported (SERIES_INFO, SLICE_SERIES): other files, or another image configuration.
    """
    from wff.ensemble import steps

    prepared = steps.preprocess(files, None, SMALL.replace(image=image_cfg, serving=_NO_LIMITS))
    local_info = tuple(json.loads(v) for v in prepared["preprocess_series_info"])
    slices = prepared["preprocess_slices"][:, 0]  # (S, H, H)
    if local_info != tuple(dx.series_info) or not np.array_equal(prepared["preprocess_slice_series"], dx.slice_series):
        raise ValueError(
            "the files decoded here give other series or slices than the server used "
            f"({len(local_info)} series / {len(slices)} slices here, {len(dx.series_info)} / {len(dx.slice_series)} served); "
            "draw overlays from the same folder that was diagnosed"
        )
    return slices


def write_overlays(
    files: Sequence[tuple[str, bytes]],
    dx: Diagnosis,
    image_cfg: ImageConfig,
    out_dir: str | Path,
    name: str,
    det_threshold: float,
) -> list[Path]:
    """One PNG per series of ``dx`` under ``out_dir`` (created), named ``<name>_s<q>_<sequence>.png``."""
    slices = detector_input(files, dx, image_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    votes = {1: "malignant", 0: "benign", -1: "abstained"}
    paths = []
    for q, info in enumerate(dx.series_info):
        members = np.flatnonzero(dx.slice_series == q)  # global slice indices of the series, in order
        d, scores = dx.slice_d[members], dx.slice_score[members]
        picked = pick_slices(d, scores, det_threshold)
        sequence = str(info.get("sequence", "series"))
        title = (f"series {q + 1} of {len(dx.series_info)}: {sequence}, {len(members)} slices; "
                 f"vote {votes.get(int(dx.series_votes[q]), '?')}, M = {float(dx.series_m[q]):.3f}; "
                 f"patient {dx.label} {dx.p_malignant:.3f}")
        image = render_series(slices[members], dx.slice_box[members], d, scores, picked, title, det_threshold)
        path = out / f"{name}_s{q + 1}_{sequence}.png"
        image.save(path)
        paths.append(path)
    return paths


def image_config_from_model_config(config: dict, base: ImageConfig = ImageConfig()) -> ImageConfig:
    """``base`` with the size of the served detector's input (its model config, as JSON)."""
    try:
        dims = [int(v) for v in config["input"][0]["dims"]]
        size = dims[-1]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"the {DETECTOR_MODEL} model config has no input dims (got {e!r}); rebuild the repository with wff repo build") from e
    return ImageConfig(size=size, clip_low=base.clip_low, clip_high=base.clip_high)


def served_image_config(url: str, timeout_s: float | None = None, **tls) -> ImageConfig:
    """The detector input size from the server, with the intensity window of the built-in profiles.

    ``tls`` are :class:`wff.client.grpc_client.DiagnosisClient`'s ssl / tls_ca / tls_cert / tls_key.
    Both profiles window at the same percentiles (wff.config.ImageConfig); a model trained with
    others needs :func:`write_overlays` called with its profile.json's image section.
    """
    from wff.client.grpc_client import DEFAULT_TIMEOUT_S, DiagnosisClient

    with DiagnosisClient(url, timeout_s=timeout_s or DEFAULT_TIMEOUT_S, **tls) as client:
        config = client.model_config(DETECTOR_MODEL)
    return image_config_from_model_config(config)
