"""DICOM decoding and series selection for one patient (the first half of the preprocess step).

Rules, as a radiologist's workstation applies them:

* every file must parse as DICOM with pixel data; all files must share one PatientID;
* slices are grouped by SeriesInstanceUID;
* a series is kept when it is sagittal: the normal of ImageOrientationPatient (row x column
  cosines) lies within ``SAGITTAL_MIN_COS`` of the patient's left-right axis;
* localizers/scouts and DERIVED or SECONDARY images are skipped;
* the sequence (T1, T2, STIR) comes from SeriesDescription patterns of the main vendors, kept
  as data in ``SEQUENCE_PATTERNS``, else from repetition/echo/inversion times;
* slices are ordered by ImagePositionPatient projected on the normal, not by file order or
  InstanceNumber;
* pixel values go through pydicom's modality LUT (rescale slope/intercept); MONOCHROME1 is
  inverted so that high values are bright.

Every problem with a file raises :class:`InputError` naming the file (its name in the request,
never a patient identifier) and what to do. Skipped series are reported with the reason.
"""

from __future__ import annotations

import io
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from wff.config import ServingConfig
from wff.ensemble.types import InputError, Series, Study

log = logging.getLogger(__name__)

SAGITTAL_MIN_COS = 0.8  # |normal . x| >= this: within about 37 degrees of sagittal
# SeriesDescription patterns, checked in order (STIR before T2: "T2 FS" / "STIR" are fat-suppressed T2).
SEQUENCE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("STIR", r"(?i)stir|tirm|\bfs\b|fat[\s_-]*sat|\bspair\b|\bspir\b|\bdixon[_ ]?w\b"),
    ("T1", r"(?i)t1"),
    ("T2", r"(?i)t2"),
)
LOCALIZER_PATTERN = r"(?i)\b(loc|locali[sz]er|scout|survey|3[- ]?plane)\b"
SKIP_IMAGE_TYPES = {"LOCALIZER", "DERIVED", "SECONDARY"}


def parse_age(text: str) -> float:
    """DICOM AS value (nnnY, nnnM, nnnW, nnnD) -> years."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD])\s*", str(text).upper())
    if match is None:
        raise InputError(f"PatientAge {text!r} is not a DICOM age string such as 045Y, 006M, 012W or 030D")
    value, unit = int(match.group(1)), match.group(2)
    return value / {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}[unit]


def sequence_of(ds: pydicom.Dataset) -> str | None:
    """T1 / T2 / STIR from the description, else from TR/TE/TI; None when unknown."""
    description = str(ds.get("SeriesDescription", "")) + " " + str(ds.get("ProtocolName", ""))
    for sequence, pattern in SEQUENCE_PATTERNS:
        if re.search(pattern, description):
            return sequence
    tr, te, ti = (float(ds.get(k) or 0) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    if 100 <= ti <= 250:
        return "STIR"
    if 0 < tr < 1000 and 0 < te < 30:
        return "T1"
    if te >= 60:
        return "T2"
    return None


def _normal(ds: pydicom.Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def _parse(name: str, data: bytes) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as e:
        raise InputError(f"{name}: not a DICOM file (no DICM preamble); send DICOM Part 10 files only") from e
    except Exception as e:  # pydicom raises many types on damaged files
        raise InputError(f"{name}: unreadable DICOM ({type(e).__name__}); the file may be truncated") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputError(f"{name}: DICOM without pixel data (e.g. a report or DICOMDIR); send image files only")
    return ds


def _pixels(name: str, ds: pydicom.Dataset) -> np.ndarray:
    """(frames, rows, cols) float32 after the modality LUT, MONOCHROME1 inverted."""
    try:
        arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except Exception as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InputError(f"{name}: pixel data cannot be decoded (transfer syntax {syntax}, {type(e).__name__}: {e})") from e
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"{name}: expected grey-level MR pixels, got an array of shape {arr.shape}")
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    return arr


def _skip_reason(ds: pydicom.Dataset) -> str | None:
    image_type = {str(v).upper() for v in ds.get("ImageType", [])}
    bad = sorted(image_type & SKIP_IMAGE_TYPES)
    if bad:
        return f"ImageType {'/'.join(bad)}"
    if re.search(LOCALIZER_PATTERN, str(ds.get("SeriesDescription", ""))):
        return "localizer/scout"
    normal = _normal(ds)
    if normal is None:
        return "no usable ImageOrientationPatient"
    if abs(normal[0]) < SAGITTAL_MIN_COS:
        plane = "axial" if abs(normal[2]) >= abs(normal[1]) else "coronal"
        return f"not sagittal ({plane} orientation)"
    if sequence_of(ds) is None:
        return "sequence type (T1/T2/STIR) not recognised from description or TR/TE/TI"
    return None


def read_study(files: Sequence[tuple[str, bytes]], limits: ServingConfig | None = None) -> Study:
    """One patient's DICOM files (name, Part 10 bytes) -> the selected sagittal series."""
    limits = limits or ServingConfig()
    if not files:
        raise InputError("no DICOM files in the request; send every file of one patient's sagittal series")
    if len(files) > limits.max_files:
        raise InputError(f"{len(files)} files exceed the limit of {limits.max_files} per patient (serving.max_files)")
    total = sum(len(data) for _, data in files)
    if total > limits.max_bytes:
        raise InputError(f"{total} bytes exceed the limit of {limits.max_bytes} per patient (serving.max_bytes)")

    groups: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
    patient_ids = set()
    for name, data in files:
        ds = _parse(name, data)
        patient_ids.add(str(ds.get("PatientID", "")))
        groups[str(ds.get("SeriesInstanceUID", "") or f"no-uid:{ds.get('SeriesNumber', '')}")].append((name, ds))
    if len(patient_ids) > 1:
        raise InputError(f"the files carry {len(patient_ids)} different PatientID values; send one patient per request")

    selected: list[Series] = []
    skipped: list[dict] = []
    for members in groups.values():
        first = members[0][1]
        summary = {"series_number": _int(first.get("SeriesNumber")), "description": str(first.get("SeriesDescription", ""))}
        reason = _skip_reason(first)
        if reason:
            skipped.append({**summary, "reason": reason})
            continue
        selected.append(_series(members, limits))
    if not selected:
        why = "; ".join(f"series {s['series_number']} {s['description']!r}: {s['reason']}" for s in skipped)
        raise InputError(f"no usable sagittal T1/T2/STIR series ({why or 'no series'})")
    selected.sort(key=lambda s: (s.series_number if s.series_number is not None else 1 << 30, s.description))
    if sum(len(s.files) for s in selected) > limits.max_slices:
        raise InputError(f"{sum(len(s.files) for s in selected)} sagittal slices exceed the limit of {limits.max_slices} (serving.max_slices)")

    age = first_age(groups)
    log.debug("study: %d series kept, %d skipped", len(selected), len(skipped))
    return Study(tuple(selected), tuple(skipped), age)


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def first_age(groups: dict) -> float | None:
    for members in groups.values():
        for _, ds in members:
            if ds.get("PatientAge"):
                try:
                    return parse_age(ds.PatientAge)
                except InputError:
                    return None
    return None


def _series(members: list[tuple[str, pydicom.Dataset]], limits: ServingConfig) -> Series:
    """Decode and order the slices of one sagittal series (multi-frame objects give several slices)."""
    first = members[0][1]
    normal = _normal(first)
    slices: list[tuple[float, str, np.ndarray]] = []
    for name, ds in members:
        frames = _pixels(name, ds)
        if frames.shape[1] * frames.shape[2] > limits.max_pixels_per_slice:
            raise InputError(f"{name}: {frames.shape[1]}x{frames.shape[2]} pixels exceed serving.max_pixels_per_slice={limits.max_pixels_per_slice}")
        positions = _frame_positions(name, ds, len(frames), normal)
        slices.extend((pos, name, frame) for pos, frame in zip(positions, frames))
    shapes = {frame.shape for _, _, frame in slices}
    if len(shapes) > 1:
        raise InputError(f"series {first.get('SeriesNumber', '?')}: slices of different sizes {sorted(shapes)}; the series is inconsistent")
    slices.sort(key=lambda item: item[0])
    spacing = first.get("PixelSpacing") or [1.0, 1.0]
    return Series(
        sequence=sequence_of(first) or "T2",
        description=str(first.get("SeriesDescription", "")),
        series_number=_int(first.get("SeriesNumber")),
        pixels=np.stack([s[2] for s in slices]),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        positions=np.array([s[0] for s in slices], np.float64),
        files=tuple(s[1] for s in slices),
    )


def _frame_positions(name: str, ds: pydicom.Dataset, n_frames: int, normal: np.ndarray) -> list[float]:
    """Position of each frame along the series normal, in mm."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames > 1 and per_frame is not None:
        positions = []
        for item in per_frame:
            plane = item.get("PlanePositionSequence")
            if not plane:
                raise InputError(f"{name}: multi-frame MR without per-frame PlanePositionSequence")
            positions.append(float(np.dot(np.array(plane[0].ImagePositionPatient, float), normal)))
        return positions
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        instance = _int(ds.get("InstanceNumber"))
        if instance is None:
            raise InputError(f"{name}: no ImagePositionPatient or InstanceNumber to order the slice by")
        return [float(instance)] * n_frames
    return [float(np.dot(np.array(ipp, float), normal))] * n_frames


def read_study_dir(path: str | Path, limits: ServingConfig | None = None) -> Study:
    """Every file under ``path`` except LabelMe/CSV sidecars, names relative to ``path``."""
    path = Path(path)
    files = [
        (str(f.relative_to(path)), f.read_bytes())
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.suffix.lower() not in (".json", ".csv", ".txt", ".md")
    ]
    if not files:
        raise InputError(f"{path}: no files; expected a patient folder of DICOM series")
    return read_study(files, limits)
