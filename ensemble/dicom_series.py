"""DICOM decoding and series selection for one patient (the first half of the preprocess step).

Input: the files of one patient as (name, Part 10 bytes) pairs, the way a request carries them.
Output: a :class:`~wff.ensemble.types.Study` with the usable sagittal T1/T2/STIR series.

Rules, as a reading workstation applies them:

* every file must parse as DICOM Part 10 (``force=False``) and hold pixel data; a DICOMDIR
  is ignored. Raw bytes are checked before pydicom reads them (:mod:`wff.ensemble.dicom_guard`):
  a deflated file is inflated only up to what is left of ``serving.max_bytes``, and a file cut
  short is reported with the element it ends in;
* one examination per request: every image must have Modality MR (when the tag is present),
  one StudyInstanceUID and one PatientID; when the PatientIDs are blank, PatientName and
  PatientBirthDate must agree too. Anything else is refused, never fused;
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
* enhanced (multi-frame) MR is read frame by frame from its functional groups;
* limits are checked on headers before any pixel is decoded: the slices of a sagittal series
  against ``serving.max_slices``, the selected series against the classifier's batch, and
  (:mod:`wff.ensemble.dicom_pixels`) NumberOfFrames against the pixel data the file holds and
  every compressed frame's own codestream header against Rows, Columns and SamplesPerPixel.

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

from wff.config import ServingConfig
from wff.ensemble import dicom_guard
from wff.ensemble.dicom_pixels import declared_frames, decode_pixels
from wff.ensemble.dicom_tags import attribute, header_int, integer, number
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
        "RepetitionTime": number(attribute(ds, "RepetitionTime")),
        "EchoTime": number(attribute(ds, "EchoTime")) or number(attribute(ds, "EffectiveEchoTime")),
        "InversionTime": number(attribute(ds, "InversionTime")) or number(attribute(ds, "InversionTimes")),
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
    if iop is None or isinstance(iop, str) or len(iop) != 6:
        return None
    try:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    except (TypeError, ValueError):  # malformed DS values
        return None
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 1e-6 else None


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") == MEDIA_STORAGE_DIRECTORY


def _parse(name: str, data: bytes) -> Dataset:
    """Part 10 bytes (a deflated file already inflated) -> dataset; InputError naming the file when
    unreadable, truncated or without pixels."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        for part in (ds.file_meta, ds):  # convert every element now: pydicom converts lazily, raising on first access
            part.walk(lambda _ds, _elem: None)
    except InvalidDicomError as e:
        raise InputError(f"{name}: not a DICOM file (no DICM preamble); send DICOM Part 10 files only") from e
    except Exception as e:  # pydicom raises many types on damaged files; the cause is chained
        cut = dicom_guard.truncation(name, data)
        tag = _tag_of(e)
        where = f" at element {tag}" if tag.startswith("(") else ""
        why = f"truncated {cut}" if cut else f"unreadable DICOM{where} ({type(e).__name__})"
        raise InputError(f"{name}: {why}; the file may be damaged or cut short, send it again") from e
    if _is_dicomdir(ds):
        return ds
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        known = isinstance(syntax, pydicom.uid.UID) and syntax.is_transfer_syntax
    except ValueError:  # a private UID
        known = False
    if not known:
        raise InputError(f"{name}: TransferSyntaxUID {str(syntax)[:64]!r} is not a DICOM transfer syntax; "
                         "the file meta information is damaged, send the file again")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        cut = dicom_guard.truncation(name, data)
        if cut:
            raise InputError(f"{name}: file truncated {cut}; send the complete file again")
        raise InputError(f"{name}: DICOM without pixel data (e.g. a structured report); send image files only")
    return ds


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


def _skip_reason(members: list[_Instance], limits: ServingConfig) -> str | None:
    """Why a series is not used, or None. A header value that cannot be read is a reason too: the
    series is skipped with the file and tag named (the request fails only if nothing else is usable)."""
    try:
        return _rule_skip_reason(members, limits)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # a malformed value pydicom kept as text
        return f"unreadable header value in {members[0].name} ({type(e).__name__}: {_tag_of(e)})"


def _tag_of(error: Exception) -> str:
    """The tag an exception's message names, e.g. "(0018,0080)", else "tag not named"."""
    tag = re.search(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)", str(error))
    return f"({tag.group(1).upper()},{tag.group(2).upper()})" if tag else "tag not named"


def orientation_reason(normal: np.ndarray) -> str | None:
    """Why a slice normal is not sagittal enough (None when it is), naming the plane, the angle and the limit.

    The angle is the one between the normal and the patient's left-right axis: 0 for a true
    sagittal slice, 90 for an axial or coronal one.
    """
    angle = math.degrees(math.acos(min(abs(float(normal[0])), 1.0)))
    if angle <= SAGITTAL_MAX_ANGLE_DEG:
        return None
    limit = f"sagittal obliques are accepted up to {SAGITTAL_MAX_ANGLE_DEG:g} degrees"
    nearest = int(np.argmax(np.abs(normal)))
    if nearest == 0:
        return f"oblique: {angle:.0f} degrees off the sagittal plane ({limit})"
    plane = ("sagittal", "coronal", "axial")[nearest]
    off = math.degrees(math.acos(min(abs(float(normal[nearest])), 1.0)))
    if off <= 10:
        return f"not sagittal ({plane} orientation)"
    return f"not sagittal (oblique {plane}: {angle:.0f} degrees off the sagittal plane; {limit})"


def _rule_skip_reason(members: list[_Instance], limits: ServingConfig) -> str | None:
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
    reason = orientation_reason(normal)
    if reason:
        return reason
    if classify_sequence(first)[0] is None:
        return "sequence type (T1/T2/STIR) not recognised from SeriesDescription or TR/TE/TI"
    n_slices = sum(m.frames for m in members)
    if n_slices > limits.max_slices:  # checked before the per-frame loop below
        return (f"{n_slices} slices (files and their NumberOfFrames), more than the {limits.max_slices} a patient may have "
                "(serving.max_slices)")
    for member in members:
        for frame in range(member.frames):
            other = slice_normal(member.ds, frame)
            if other is None or abs(float(np.dot(normal, other))) < SAME_ORIENTATION_COS:
                return "slices with different or unreadable orientations (ImageOrientationPatient) in one series"
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
    """Series, slice and image-size limits, checked on the headers before any pixel is decoded."""
    if len(selected) > limits.max_batch_classifier:
        raise InputError(
            f"{len(selected)} sagittal T1/T2/STIR series selected, more than the {limits.max_batch_classifier} one patient may "
            "have (serving.max_batch_classifier: one classifier clip per series); send one patient's study, without repeated series"
        )
    n_slices = sum(m.frames for members in selected for m in members)
    if n_slices > limits.max_slices:
        raise InputError(
            f"{n_slices} sagittal slices exceed the limit of {limits.max_slices} per patient (serving.max_slices); send fewer series"
        )
    for members in selected:
        for m in members:
            pixels = header_int(m.name, m.ds, "Rows", 0) * header_int(m.name, m.ds, "Columns", 0)
            if pixels > limits.max_pixels_per_slice:
                raise InputError(
                    f"{m.name}: {m.ds.Rows}x{m.ds.Columns} pixels exceed the limit of {limits.max_pixels_per_slice} per slice "
                    "(serving.max_pixels_per_slice)"
                )


def _skip_record(members: list, reason: str) -> dict:
    """What the response reports about a skipped series (no identifiers): its first file by name."""
    first = members[0].ds
    return {"series_number": integer(first.get("SeriesNumber")), "description": _description(first), "reason": reason,
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


# Attributes that must agree across a request's images: one examination of one patient. PatientName and
# PatientBirthDate are compared only when PatientID is blank (anonymised exports), and never echoed.
EXAMINATION_TAGS = ("StudyInstanceUID", "PatientID")
BLANK_ID_TAGS = ("PatientName", "PatientBirthDate")


def _check_modality(name: str, ds: Dataset) -> None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality != "MR":
        raise InputError(f"{name}: Modality {modality[:16]!r}, not MR; send the patient's MR images only")


def _check_same_examination(name: str, ds: Dataset, first: tuple[str, Dataset] | None) -> None:
    """InputError when ``ds`` belongs to another study or patient than the request's first image."""
    if first is None:
        return
    first_name, first_ds = first
    tags = EXAMINATION_TAGS + (BLANK_ID_TAGS if not str(ds.get("PatientID", "") or "").strip() else ())
    for tag in tags:
        if str(ds.get(tag, "") or "").strip() != str(first_ds.get(tag, "") or "").strip():
            what = "two examinations: send one study per request" if tag == "StudyInstanceUID" else \
                "more than one patient: send one patient per request"
            blank = " (PatientID blank in both)" if tag in BLANK_ID_TAGS else ""
            raise InputError(f"{name}: different {tag} from {first_name}{blank}; the files belong to {what}")


def _read_study(files: Sequence[tuple[str, bytes]], limits: ServingConfig) -> Study:
    groups: dict[str, list[_Instance]] = defaultdict(list)
    seen_sops: set[str] = set()
    first: tuple[str, Dataset] | None = None  # (file name, dataset) of the first image
    inflate_left = limits.max_bytes - sum(len(data) for _, data in files)  # what deflated files may grow by
    for name, data in files:
        plain = dicom_guard.inflate_bounded(name, data, inflate_left + len(data))
        inflate_left -= len(plain) - len(data)
        ds = _parse(name, plain)
        if _is_dicomdir(ds):
            log.debug("%s: DICOMDIR ignored", name)
            continue
        sop = str(ds.get("SOPInstanceUID", "")) or name
        if sop in seen_sops:
            log.debug("%s: duplicate SOP instance ignored", name)
            continue
        seen_sops.add(sop)
        _check_modality(name, ds)
        _check_same_examination(name, ds, first)
        first = first or (name, ds)
        key = str(ds.get("SeriesInstanceUID", "")) or f"number:{ds.get('SeriesNumber', '')}:{_description(ds)}"
        groups[key].append(_Instance(name, ds, declared_frames(name, ds)))
    if not groups:
        raise InputError("no image files in the request (only a DICOMDIR); send the image files themselves")

    candidates, skipped = [], []
    for members in groups.values():
        reason = _skip_reason(members, limits)
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
        frames = decode_pixels(m.name, m.ds, m.frames)
        slices.extend(zip(_frame_positions(m, normal), [m.name] * len(frames), frames))
    shapes = sorted({frame.shape for _, _, frame in slices})
    if len(shapes) > 1:
        return None, f"slices of different sizes {shapes}"
    slices.sort(key=lambda item: item[0])
    spacing = attribute(first, "PixelSpacing")
    if spacing is None or isinstance(spacing, str) or len(spacing) != 2:
        log.debug("series %s: no PixelSpacing, 1 mm assumed", first.get("SeriesNumber", "?"))
        spacing = (1.0, 1.0)
    if number(spacing[0]) is None or number(spacing[1]) is None:
        raise InputError(f"{members[0].name}: PixelSpacing is not two numbers; the header is malformed, send the file again")
    sequence, source = classify_sequence(first)
    series = Series(
        sequence=sequence,
        description=_description(first),
        series_number=integer(first.get("SeriesNumber")),
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
