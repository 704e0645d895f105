"""DICOM decoding and series selection for one patient (the first half of the preprocess step).

Input: the files of one patient as (name, Part 10 bytes) pairs, the way a request carries them.
Output: a :class:`~wff.ensemble.types.Study` with the usable sagittal T1/T2/STIR series.

Rules, as a reading workstation applies them:

* every file must parse as DICOM Part 10 (``force=False``) and hold pixel data; a DICOMDIR
  is ignored; all files must share one PatientID;
* instances are grouped by SeriesInstanceUID;
* localizers/scouts (ImageType LOCALIZER or a description such as "3-plane loc") and
  secondary or reformatted images (ImageType SECONDARY, or DERIVED with MPR/MIP/PROJECTION/
  SUBTRACTION) are skipped. Plain ``DERIVED\\PRIMARY`` images are kept: scanners mark
  distortion-corrected originals that way (e.g. Siemens ``DIS2D``);
* a series is kept when it is sagittal: the normal of ImageOrientationPatient (row x column
  cosines) is within ``SAGITTAL_MAX_ANGLE_DEG`` of the patient's left-right (x) axis;
* series that are not T1/T2/STIR images are skipped by ``DESCRIPTION_SKIP_RULES`` and
  ``IMAGE_TYPE_SKIP_RULES``: post-contrast, diffusion, T2* gradient echo, Dixon fat-only and
  in/opposed-phase images;
* the sequence comes from SeriesDescription (ProtocolName when empty) by the regex rules in
  ``SEQUENCE_RULES`` (MONAI series-selector style; Siemens, GE, Philips, Canon and Hitachi
  naming), else from TR/TE/TI by ``TIMING_RULES``; an unrecognised series is skipped. Each
  selected series records which rule decided (``Series.sequence_source``);
* slices are ordered by ImagePositionPatient projected on the normal, never by file order or
  InstanceNumber;
* pixels go through pydicom's :func:`~pydicom.pixels.apply_modality_lut`; MONOCHROME1 is
  inverted over its representable range so that high values are bright in every slice;
* enhanced (multi-frame) MR is read frame by frame from its functional groups.

Problems with a file raise :class:`InputError` naming the file (its name in the request, never
a patient identifier) and what to do. Skipped series are reported with their reason. Nothing
here logs identifiers or pixel values.
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from wff.config import ServingConfig
from wff.ensemble.types import InputError, Series, Study

log = logging.getLogger(__name__)

SAGITTAL_MAX_ANGLE_DEG = 30.0  # sagittal obliques up to this angle from the x axis are accepted
SAME_ORIENTATION_COS = 0.99  # slices of one series whose normals differ more are inconsistent
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an image; ignored

# Word edges for description patterns: "_" separates words too (Siemens: t2_tse_fs_sag), so \b won't do.
_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"
_FAT_SAT = rf"({_B}fs{_E}|fat[\s_-]*(sat|supp)|spair|{_B}spir{_E}|dixon|{_B}ideal{_E})"
# Sequence rules, first match wins: each key other than "sequence" is a tag keyword and a regex
# searched in its text (SeriesDescription falls back on ProtocolName when empty). The STIR rules
# come first because fat-suppressed T2 descriptions also contain "T2"; the paper counts FS-T2WI
# with T2, the serving contracts call that class STIR. A fat-saturated T1 stays T1.
SEQUENCE_RULES: tuple[dict[str, str], ...] = (
    {"sequence": "STIR", "SeriesDescription": rf"(?i)stir|tirm|{_B}tir{_E}"},
    {"sequence": "STIR", "SeriesDescription": rf"(?i)t2.*{_FAT_SAT}|{_FAT_SAT}.*t2"},
    {"sequence": "T1", "SeriesDescription": r"(?i)t1"},
    {"sequence": "T2", "SeriesDescription": r"(?i)t2"},
)
# When no description rule matches: [low, high) ranges in ms of the acquisition timing.
TIMING_RULES: tuple[dict, ...] = (
    {"sequence": "STIR", "InversionTime": (100.0, 250.0)},  # short-tau inversion nulls fat at 1.5-3 T
    {"sequence": "T1", "InversionTime": (600.0, 1200.0), "EchoTime": (1.0, 30.0)},  # T1 FLAIR (GE, Siemens)
    {"sequence": "T1", "RepetitionTime": (1.0, 1000.0), "EchoTime": (1.0, 30.0)},
    {"sequence": "T2", "RepetitionTime": (1500.0, math.inf), "EchoTime": (60.0, math.inf)},
)
# Series skipped by description, checked before the sequence rules.
DESCRIPTION_SKIP_RULES: tuple[dict[str, str], ...] = (
    {"reason": "localizer/scout", "SeriesDescription": rf"(?i){_B}(loc|locali[sz]er|scout|survey|3[\s_-]?pl(ane)?){_E}"},
    {"reason": "post-contrast series (the model reads T1, T2 and STIR without contrast)",
     "SeriesDescription": rf"(?i)\+\s*c{_E}|{_B}(post|gd|ce){_E}|gado|contrast"},
    {"reason": "diffusion-weighted series (DWI/ADC)",
     "SeriesDescription": rf"(?i){_B}(dwi|adc|diff(usion)?|trace[wd]?|ep2d[\s_-]*diff|resolve){_E}"},
    {"reason": "T2* gradient-echo series (not a T2 spin echo)",
     "SeriesDescription": rf"(?i)t2\s*\*|{_B}(t2[\s_-]*star|medic|merge|swi|hemo){_E}"},
    {"reason": "Dixon fat, in-phase or opposed-phase image (only the water image is read, as STIR)",
     "SeriesDescription": rf"(?i)dixon.*{_B}(f|fat|in|ip|opp|op){_E}"},
)
# Series skipped by a value of ImageType (0008,0008), e.g. Siemens Dixon DERIVED\PRIMARY\DIXON\FAT.
IMAGE_TYPE_SKIP_RULES: tuple[dict, ...] = (
    {"reason": "Dixon fat, in-phase or opposed-phase image (only the water image is read, as STIR)",
     "ImageType": {"FAT", "IN_PHASE", "OPP_PHASE", "OUT_PHASE"}},
    {"reason": "diffusion-weighted series (DWI/ADC)", "ImageType": {"DIFFUSION", "ADC", "TRACEW"}},
)
# ImageType values of a fat-suppressed water image: read as STIR when the description is silent.
WATER_IMAGE_TYPES = {"WATER"}
REFORMAT_IMAGE_TYPES = {"MPR", "MIP", "PROJECTION IMAGE", "SUBTRACTION", "REFORMATTED"}
# Enhanced (multi-frame) MR keeps these attributes in functional-group sequences.
FUNCTIONAL_GROUPS = {
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "ImagePositionPatient": "PlanePositionSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "RepetitionTime": "MRTimingAndRelatedParametersSequence",
    "EffectiveEchoTime": "MREchoSequence",
    "InversionTimes": "MRModifierSequence",
}
AGE_UNITS = {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0}  # DICOM AS unit -> per year


@dataclass(frozen=True)
class _Instance:
    name: str  # file name in the request
    ds: Dataset
    frames: int  # NumberOfFrames, 1 for single-frame objects


def parse_age(text: str) -> float:
    """DICOM AS value (PS3.5 6.2: ``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``) -> years.

    "045Y" -> 45.0, "006M" -> 0.5, "012W" -> 0.23, "030D" -> 0.08. Up to three digits are
    accepted (some exporters drop the leading zeros); anything else raises InputError.
    """
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise InputError(f"PatientAge {text!r} is not a DICOM age string such as 045Y, 006M, 012W or 030D")
    return int(match.group(1)) / AGE_UNITS[match.group(2).upper()]


def _item(sequence, index: int) -> Dataset | None:
    if sequence is None or len(sequence) <= index:
        return None
    return sequence[index]


def attribute(ds: Dataset, keyword: str, frame: int = 0):
    """A tag's value: top level, else the per-frame then shared functional groups; None if absent."""
    if keyword in ds:
        return ds[keyword].value
    group = FUNCTIONAL_GROUPS.get(keyword)
    if group is None:
        return None
    for container in (_item(ds.get("PerFrameFunctionalGroupsSequence"), frame), _item(ds.get("SharedFunctionalGroupsSequence"), 0)):
        item = _item(container.get(group), 0) if container is not None else None
        if item is not None and keyword in item:
            return item[keyword].value
    return None


def _float(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _description(ds: Dataset) -> str:
    return str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "").strip()


def _image_types(ds: Dataset) -> list[str]:
    value = ds.get("ImageType", [])
    return [str(v).strip().upper() for v in ([value] if isinstance(value, str) else value)]


def classify_sequence(ds: Dataset) -> tuple[str | None, str]:
    """(sequence, why): "T1" / "T2" / "STIR" and the rule that decided, or (None, "") when unknown.

    The description rules come first, then a Dixon water ImageType, then the timing rules;
    ``why`` quotes the description or the timing, e.g. ``SeriesDescription 't2_tirm_sag'``.
    """
    description = _description(ds)
    text = {"SeriesDescription": description}
    for rule in SEQUENCE_RULES:
        if all(re.search(pattern, text.get(key, str(ds.get(key, "")))) for key, pattern in rule.items() if key != "sequence"):
            return rule["sequence"], f"SeriesDescription {description!r}"
    if WATER_IMAGE_TYPES & set(_image_types(ds)):
        return "STIR", "ImageType WATER (Dixon fat-suppressed image)"
    timing = {
        "RepetitionTime": _float(attribute(ds, "RepetitionTime")),
        "EchoTime": _float(attribute(ds, "EchoTime")) or _float(attribute(ds, "EffectiveEchoTime")),
        "InversionTime": _float(attribute(ds, "InversionTime")) or _float(attribute(ds, "InversionTimes")),
    }
    for rule in TIMING_RULES:
        tests = [(timing[key], bounds) for key, bounds in rule.items() if key != "sequence"]
        if all(value is not None and bounds[0] <= value < bounds[1] for value, bounds in tests):
            known = ", ".join(f"{key} {value:g} ms" for key, value in timing.items() if value is not None)
            return rule["sequence"], f"timing ({known})"
    return None, ""


def sequence_of(ds: Dataset) -> str | None:
    """"T1" / "T2" / "STIR" by :func:`classify_sequence`; None when unknown."""
    return classify_sequence(ds)[0]


def slice_normal(ds: Dataset, frame: int = 0) -> np.ndarray | None:
    """Unit normal (row cosines x column cosines) of ImageOrientationPatient, or None."""
    iop = attribute(ds, "ImageOrientationPatient", frame)
    if iop is None or len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 1e-6 else None


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") == MEDIA_STORAGE_DIRECTORY


def _parse(name: str, data: bytes) -> Dataset:
    """Part 10 bytes -> dataset; InputError naming the file when unreadable or without pixels."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError as e:
        raise InputError(f"{name}: not a DICOM file (no DICM preamble); send DICOM Part 10 files only") from e
    except Exception as e:  # pydicom raises many types on damaged files; the cause is chained
        raise InputError(f"{name}: unreadable DICOM ({type(e).__name__}); the file may be truncated, send it again") from e
    if _is_dicomdir(ds):
        return ds
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f"{name}: DICOM without pixel data (e.g. a structured report); send image files only")
    return ds


def _stored_range(ds: Dataset) -> np.ndarray:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    return np.array([0, 2**bits - 1])


def _pixels(name: str, ds: Dataset) -> np.ndarray:
    """(frames, rows, cols) float32 modality values, MONOCHROME1 inverted."""
    try:
        stored = ds.pixel_array
    except Exception as e:  # missing decoder, truncated or inconsistent pixel data; cause chained
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        raise InputError(
            f"{name}: pixel data cannot be decoded ({syntax_name}: {type(e).__name__}); the file may be "
            "truncated or use a compression without an installed decoder: send uncompressed DICOM"
        ) from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if stored.ndim != (2 if frames == 1 else 3) or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"{name}: expected grey-level MR pixels, got {ds.get('PhotometricInterpretation')} array of shape {stored.shape}")
    stored = stored.reshape(frames, *stored.shape[-2:])
    out = np.empty(stored.shape, np.float32)
    for f in range(frames):
        lut = ds if ("RescaleSlope" in ds or "ModalityLUTSequence" in ds) else _frame_rescale(ds, f)
        out[f] = apply_modality_lut(stored[f], lut)
        if photometric == "MONOCHROME1":
            lo, hi = apply_modality_lut(_stored_range(ds), lut).astype(np.float64)
            out[f] = np.float32(lo + hi) - out[f]
    return out


def _frame_rescale(ds: Dataset, frame: int) -> Dataset:
    """A minimal dataset carrying one frame's rescale from the functional groups (identity if none)."""
    lut = Dataset()
    slope, intercept = _float(attribute(ds, "RescaleSlope", frame)), _float(attribute(ds, "RescaleIntercept", frame))
    if slope is not None and intercept is not None:
        lut.RescaleSlope, lut.RescaleIntercept = slope, intercept
    return lut


def _image_type_reason(ds: Dataset) -> str | None:
    values = _image_types(ds)
    for rule in IMAGE_TYPE_SKIP_RULES:
        if rule["ImageType"] & set(values):
            return rule["reason"]
    if "LOCALIZER" in values:
        return "localizer/scout (ImageType LOCALIZER)"
    if len(values) > 1 and values[1] == "SECONDARY":
        return "secondary capture or reformat (ImageType SECONDARY)"
    reformat = sorted(REFORMAT_IMAGE_TYPES & set(values))
    if values[:1] == ["DERIVED"] and reformat:
        return f"derived reformat (ImageType DERIVED {'/'.join(reformat)})"
    return None


def _skip_reason(members: list[_Instance]) -> str | None:
    """Why a series is not used, or None; a header value that cannot be read is a reason too."""
    try:
        return _rule_skip_reason(members)
    except (ValueError, TypeError, KeyError) as e:  # malformed DS/IS values and the like
        return f"unreadable header value in {members[0].name} ({type(e).__name__})"


def _rule_skip_reason(members: list[_Instance]) -> str | None:
    first = members[0].ds
    reason = _image_type_reason(first)
    if reason:
        return reason
    for rule in DESCRIPTION_SKIP_RULES:
        if re.search(rule["SeriesDescription"], _description(first)):
            return rule["reason"]
    normal = slice_normal(first)
    if normal is None:
        return "no usable ImageOrientationPatient"
    if abs(normal[0]) < math.cos(math.radians(SAGITTAL_MAX_ANGLE_DEG)):
        plane = "axial" if abs(normal[2]) >= abs(normal[1]) else "coronal"
        return f"not sagittal ({plane} orientation)"
    for member in members:
        for frame in range(member.frames):
            other = slice_normal(member.ds, frame)
            if other is None or abs(float(np.dot(normal, other))) < SAME_ORIENTATION_COS:
                return "slices with different orientations in one series"
    if classify_sequence(first)[0] is None:
        return "sequence type (T1/T2/STIR) not recognised from SeriesDescription or TR/TE/TI"
    return None


def _check_request(files: Sequence[tuple[str, bytes]], limits: ServingConfig) -> None:
    if not files:
        raise InputError("no DICOM files in the request; send every file of one patient's sagittal series")
    if len(files) > limits.max_files:
        raise InputError(f"{len(files)} files exceed the limit of {limits.max_files} per patient (serving.max_files)")
    total = sum(len(data) for _, data in files)
    if total > limits.max_bytes:
        raise InputError(f"{total} bytes exceed the limit of {limits.max_bytes} per patient (serving.max_bytes)")


def _check_selected(selected: list[list[_Instance]], limits: ServingConfig) -> None:
    """Slice and image-size limits, checked on the headers before any pixel is decoded."""
    n_slices = sum(m.frames for members in selected for m in members)
    if n_slices > limits.max_slices:
        raise InputError(
            f"{n_slices} sagittal slices exceed the limit of {limits.max_slices} per patient (serving.max_slices); send fewer series"
        )
    for members in selected:
        for m in members:
            pixels = int(m.ds.get("Rows", 0)) * int(m.ds.get("Columns", 0))
            if pixels > limits.max_pixels_per_slice:
                raise InputError(
                    f"{m.name}: {m.ds.Rows}x{m.ds.Columns} pixels exceed the limit of {limits.max_pixels_per_slice} per slice "
                    "(serving.max_pixels_per_slice)"
                )


def _skip_record(members: list, reason: str) -> dict:
    """What the response reports about a skipped series (no identifiers): its first file by name."""
    first = members[0].ds
    return {"series_number": _int(first.get("SeriesNumber")), "description": _description(first), "reason": reason,
            "files": len(members), "first_file": members[0].name}


def _by_series_number(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda s: (s["series_number"] if s["series_number"] is not None else math.inf, s["description"]))


def _nothing_usable(skipped: list[dict], advice: str = "") -> InputError:
    why = "; ".join(
        f"series {s['series_number']} {s['description']!r} ({s['files']} file{'s' * (s['files'] != 1)} from {s['first_file']}): {s['reason']}"
        for s in _by_series_number(skipped)
    )
    return InputError(f"no usable sagittal T1/T2/STIR series ({why}){advice}")


def read_study(files: Sequence[tuple[str, bytes]], limits: ServingConfig | None = None) -> Study:
    """One patient's DICOM files (name, Part 10 bytes) -> the selected sagittal series.

    Series are ordered by SeriesNumber, then description; slices of a series ascend along the
    slice normal. Raises InputError when a file is unusable, when the files belong to more
    than one patient, when a limit of ``limits`` (default ServingConfig()) is exceeded, or when
    no series is usable (the message gives each series' reason).
    """
    limits = limits or ServingConfig()
    _check_request(files, limits)
    with _values_not_echoed():
        return _read_study(files, limits)


@contextmanager
def _values_not_echoed() -> Iterator[None]:
    """pydicom quiet about invalid element values while a request is read.

    pydicom warns, and logs, the offending value ("Invalid value for VR DS: '<value>'") when it
    converts a malformed element on access. The reader only reads technical tags, but it must
    never echo tag contents into the server log; the malformed values that matter are reported
    as InputError or skip reasons, naming the file only.
    """
    mode = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            yield
    finally:
        pydicom_config.settings.reading_validation_mode = mode


def _read_study(files: Sequence[tuple[str, bytes]], limits: ServingConfig) -> Study:
    groups: dict[str, list[_Instance]] = defaultdict(list)
    seen_sops: set[str] = set()
    first_patient: tuple[str, str] | None = None  # (file name, PatientID) of the first image
    for name, data in files:
        ds = _parse(name, data)
        if _is_dicomdir(ds):
            log.debug("%s: DICOMDIR ignored", name)
            continue
        sop = str(ds.get("SOPInstanceUID", "")) or name
        if sop in seen_sops:
            log.debug("%s: duplicate SOP instance ignored", name)
            continue
        seen_sops.add(sop)
        patient_id = str(ds.get("PatientID", ""))
        if first_patient is None:
            first_patient = (name, patient_id)
        elif patient_id != first_patient[1]:
            raise InputError(
                f"{name}: different PatientID from {first_patient[0]}; the files belong to more than one patient: "
                "send one patient per request"
            )
        key = str(ds.get("SeriesInstanceUID", "")) or f"number:{ds.get('SeriesNumber', '')}:{_description(ds)}"
        groups[key].append(_Instance(name, ds, int(ds.get("NumberOfFrames", 1) or 1)))
    if not groups:
        raise InputError("no image files in the request (only a DICOMDIR); send the image files themselves")

    candidates, skipped = [], []
    for members in groups.values():
        reason = _skip_reason(members)
        if reason:
            skipped.append(_skip_record(members, reason))
        else:
            candidates.append(members)
    if not candidates:
        raise _nothing_usable(skipped, "; send the sagittal T1 and T2/STIR series")
    _check_selected(candidates, limits)

    selected = []
    for members in candidates:
        series, reason = _series(members)
        if series is None:
            skipped.append(_skip_record(members, reason))
        else:
            selected.append(series)
    if not selected:
        raise _nothing_usable(skipped)
    selected.sort(key=lambda s: (s.series_number if s.series_number is not None else math.inf, s.description))
    log.debug("study: %d series kept, %d skipped", len(selected), len(skipped))
    return Study(tuple(selected), tuple(_by_series_number(skipped)), _patient_age([m for members in candidates for m in members]))


def _patient_age(members: list[_Instance]) -> float | None:
    for m in members:
        text = m.ds.get("PatientAge")
        if text:
            try:
                return parse_age(text)
            except InputError:
                log.debug("%s: PatientAge is not a DICOM age string; age left to the request", m.name)
                return None
    return None


def _frame_positions(m: _Instance, normal: np.ndarray) -> list[float]:
    """Position of each frame of an instance along the series normal, in mm."""
    positions = []
    for frame in range(m.frames):
        ipp = attribute(m.ds, "ImagePositionPatient", frame)
        if ipp is None or len(ipp) != 3:
            raise InputError(f"{m.name}: no ImagePositionPatient for frame {frame + 1}; slices cannot be ordered without it")
        try:
            positions.append(float(np.dot(np.asarray(ipp, float), normal)))
        except (ValueError, TypeError) as e:  # malformed DS values
            raise InputError(
                f"{m.name}: ImagePositionPatient of frame {frame + 1} is not three numbers; slices cannot be ordered without it"
            ) from e
    return positions


def _series(members: list[_Instance]) -> tuple[Series | None, str]:
    """Decode and order one sagittal series; (None, reason) when its slices are inconsistent."""
    first = members[0].ds
    normal = slice_normal(first)
    slices: list[tuple[float, str, np.ndarray]] = []
    for m in members:
        frames = _pixels(m.name, m.ds)
        slices.extend(zip(_frame_positions(m, normal), [m.name] * len(frames), frames))
    shapes = sorted({frame.shape for _, _, frame in slices})
    if len(shapes) > 1:
        return None, f"slices of different sizes {shapes}"
    slices.sort(key=lambda item: item[0])
    spacing = attribute(first, "PixelSpacing")
    if spacing is None or len(spacing) != 2:
        log.debug("series %s: no PixelSpacing, 1 mm assumed", first.get("SeriesNumber", "?"))
        spacing = (1.0, 1.0)
    sequence, source = classify_sequence(first)
    series = Series(
        sequence=sequence,
        description=_description(first),
        series_number=_int(first.get("SeriesNumber")),
        pixels=np.stack([frame for _, _, frame in slices]),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        positions=np.array([pos for pos, _, _ in slices], np.float64),
        files=tuple(name for _, name, _ in slices),
        sequence_source=source,
    )
    return series, ""


def read_study_dir(path: str | Path, limits: ServingConfig | None = None) -> Study:
    """Every file under the folder ``path`` (recursively) except ``*.json``, ``*.csv`` and hidden files.

    File names in the Study (and in error messages) are POSIX paths relative to ``path``, e.g.
    ``S03_T2/IM0007.dcm``. Request limits apply as in :func:`read_study`; file count and size
    are checked before the files are read.
    """
    limits = limits or ServingConfig()
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; expected a patient folder of DICOM series")
    paths = [
        f for f in sorted(root.rglob("*"))
        if f.is_file() and f.suffix.lower() not in (".json", ".csv") and not any(part.startswith(".") for part in f.relative_to(root).parts)
    ]
    if not paths:
        raise InputError(f"{root}: no files; expected a patient folder of DICOM series")
    if len(paths) > limits.max_files:
        raise InputError(f"{root}: {len(paths)} files exceed the limit of {limits.max_files} per patient (serving.max_files)")
    total = sum(f.stat().st_size for f in paths)
    if total > limits.max_bytes:
        raise InputError(f"{root}: {total} bytes exceed the limit of {limits.max_bytes} per patient (serving.max_bytes)")
    return read_study([(f.relative_to(root).as_posix(), f.read_bytes()) for f in paths], limits)
