"""Map a served diagnosis back to the source images: which instance (and frame) each served slice
is, and where a detector box lies in that image's own pixels.

The served outputs index slices in the order the preprocess step made them: series after series
(SERIES_INFO order), each series' slices ascending along its slice normal (never file order). The
instances are re-read here with the same reader, :func:`wff.ensemble.dicom_series.read_study`, and
its series are matched to the served SERIES_INFO; slice k of a series is then the k-th of its
``Series.files``. A multi-frame (enhanced MR) instance contributes one slice per frame: its k-th
appearance in ``Series.files`` is its k-th frame in ascending position (the reader's stable sort).

Boxes: the detector sees each slice letterboxed (:func:`wff.ensemble.preprocess.letterbox`): scaled
by ``scale = size / max(rows, cols)``, top-left anchored, padded at the bottom/right. A detector
box (x1, y1, x2, y2) maps back to source pixels as (x1 / scale, ..., y2 / scale), clipped to the
image (a box may reach into the padding). Source pixel coordinates are DICOM's image-relative ones
(PS3.3 C.10.5.1.2, SCOORD and PIXEL annotation units): (0, 0) is the top-left corner of the
top-left pixel, (columns, rows) the bottom-right corner of the bottom-right one; x runs along a
row (column index), y down the columns (row index).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from wff.config import ServingConfig
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.dicom_pixels import declared_frames
from wff.ensemble.dicom_series import read_study, slice_normal
from wff.ensemble.dicom_tags import attribute
from wff.ensemble.preprocess import series_info
from wff.ensemble.types import Series, Study

# The server enforced its request limits already; reading again here must not add others.
_NO_LIMITS = ServingConfig(max_files=2**31, max_bytes=2**62, max_slices=2**31, max_pixels_per_slice=2**62, max_batch_classifier=2**31)


@dataclass(frozen=True)
class SourceSlice:
    """One served slice as the image it came from."""

    dataset: Dataset  # the instance holding the slice
    frame: int | None  # 1-based frame number in a multi-frame instance; None for a single-frame one
    rows: int
    cols: int


@dataclass(frozen=True)
class KeySlice:
    """The slice of a series whose best box scored highest, and that box in the slice's own pixels."""

    series: int  # index into the diagnosis' series_info
    slice_index: int  # served slice index (into slice_d, slice_box, ...)
    source: SourceSlice
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in source pixels (columns, rows), inside the image
    d: float  # the detector's P(malignant) for the box
    score: float  # the box's detection score
    window: tuple[float, float]  # (center, width) of the series' intensity window in modality values, for display


def source_box(box: Sequence[float], scale: float, rows: int, cols: int) -> tuple[float, float, float, float]:
    """Detector box (x1, y1, x2, y2) of a slice letterboxed by ``scale`` -> the same box in the source
    slice's pixels, clipped to [0, cols] x [0, rows]."""
    if not scale > 0:
        raise ValueError(f"letterbox scale must be > 0, got {scale}")
    x1, y1, x2, y2 = (float(v) / scale for v in box)
    return (min(max(x1, 0.0), cols), min(max(y1, 0.0), rows), min(max(x2, 0.0), cols), min(max(y2, 0.0), rows))


def letterbox_scale(size: int, rows: int, cols: int) -> float:
    """Detector pixels per source pixel of a rows x cols slice letterboxed to ``size`` (preprocess.letterbox)."""
    return size / max(rows, cols)


def part10(ds: Dataset) -> bytes:
    """``ds`` as DICOM Part 10 bytes. A dataset without a file meta Transfer Syntax UID (e.g. decoded from
    the network) is written as explicit VR little endian when its pixel data is native."""
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        if "PixelData" in ds and ds["PixelData"].is_undefined_length:
            raise ValueError(f"instance {ds.get('SOPInstanceUID', '?')}: compressed pixel data without a file meta Transfer "
                             "Syntax UID; pass the instances as read from their Part 10 files")
        ds = ds.copy()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _matching_series(study: Study, dx: Diagnosis) -> list[Series]:
    """The study's series in the order of ``dx.series_info``; ValueError when one is not found."""
    local = [(series_info(0, s), s) for s in study.series]
    matched = []
    for served in dx.series_info:
        key = {k: v for k, v in served.items() if k != "index"}
        found = [s for info, s in local if {k: v for k, v in info.items() if k != "index"} == key]
        if len(found) != 1:
            raise ValueError(
                f"the instances give {'no' if not found else 'several'} series like served series {served.get('index', '?')} "
                f"({served.get('sequence')}, {served.get('n_slices')} slices of {served.get('rows')}x{served.get('cols')}); "
                "make results from the same instances that were diagnosed"
            )
        matched.append(found[0])
    return matched


def _frame_order(ds: Dataset, frames: int) -> list[int]:
    """0-based frame indices of a multi-frame instance in ascending position along its slice normal."""
    normal = slice_normal(ds)
    if normal is None:
        return list(range(frames))
    positions = []
    for f in range(frames):
        ipp = attribute(ds, "ImagePositionPatient", f)
        positions.append(float(np.dot(np.asarray(ipp, float), normal)) if ipp is not None and len(ipp) == 3 else math.inf)
    return sorted(range(frames), key=lambda f: positions[f])


@dataclass(frozen=True)
class Sources:
    """The diagnosed instances as the server read them."""

    slices: tuple[SourceSlice, ...]  # one per served slice, in served order
    series: tuple[Series, ...]  # the re-read series, in the diagnosis' series_info order


def read_sources(datasets: Sequence[Dataset], dx: Diagnosis) -> Sources:
    """The source of every served slice of ``dx`` (one per ``dx.slice_series`` entry, in order), and
    the re-read series in ``dx.series_info`` order.

    ``datasets`` are the diagnosed instances, pixel data included. ValueError when they do not
    give the series and slice counts the server reported.
    """
    by_name = {str(i): ds for i, ds in enumerate(datasets)}
    study = read_study([(name, part10(ds)) for name, ds in by_name.items()], _NO_LIMITS)
    matched = _matching_series(study, dx)
    counts = np.bincount(dx.slice_series, minlength=len(matched)) if dx.slice_series.size else np.zeros(len(matched), int)
    out: list[SourceSlice] = []
    for q, series in enumerate(matched):
        if counts[q] != len(series.files) or not np.array_equal(np.flatnonzero(dx.slice_series == q),
                                                                np.arange(len(out), len(out) + len(series.files))):
            raise ValueError(f"served series {q} has {counts[q]} slices where the instances give {len(series.files)}; "
                             "make results from the same instances that were diagnosed")
        seen: dict[str, int] = {}
        rows, cols = series.pixels.shape[1:]
        for name in series.files:
            ds = by_name[name]
            frames = declared_frames(name, ds)
            k = seen.get(name, 0)
            seen[name] = k + 1
            frame = None if frames == 1 and "NumberOfFrames" not in ds else _frame_order(ds, frames)[k] + 1
            out.append(SourceSlice(ds, frame, int(rows), int(cols)))
    return Sources(tuple(out), tuple(matched))


def display_window(pixels: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """(center, width) of a window over the ``low_pct``..``high_pct`` percentiles of a series' modality values."""
    lo, hi = (float(v) for v in np.percentile(pixels, [low_pct, high_pct]))
    width = max(hi - lo, 1.0)
    return (lo + hi) / 2, width


def key_slices(sources: Sources, dx: Diagnosis, detector_size: int) -> list[KeySlice]:
    """One key slice per series that has a box: the slice whose best box scored highest (the first
    such slice on a tie), with that box mapped to the slice's pixels. ``detector_size`` is the
    detector's input side in pixels (the served detector's input dims). Series without boxes give none."""
    if detector_size < 1:
        raise ValueError(f"detector_size must be the detector's input side in pixels (>= 1), got {detector_size}")
    keys = []
    for q, s in enumerate(sources.series):
        members = np.flatnonzero(dx.slice_series == q)
        has_box = ~np.isnan(dx.slice_d[members])
        if not has_box.any():
            continue
        k = int(members[np.argmax(np.where(has_box, dx.slice_score[members], -np.inf))])
        src = sources.slices[k]
        scale = letterbox_scale(detector_size, src.rows, src.cols)
        keys.append(KeySlice(
            series=q,
            slice_index=k,
            source=src,
            box=source_box(dx.slice_box[k], scale, src.rows, src.cols),
            d=float(dx.slice_d[k]),
            score=float(dx.slice_score[k]),
            window=display_window(s.pixels),
        ))
    return keys


def best_key_slice(keys: Sequence[KeySlice]) -> KeySlice | None:
    """The key slice with the highest box score over all series (the first on a tie); None without boxes."""
    return max(keys, key=lambda k: k.score, default=None)
