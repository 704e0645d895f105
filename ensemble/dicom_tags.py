"""Reading tag values of a parsed DICOM data set without trusting them.

pydicom keeps a malformed IS/DS value as text and converts lazily; these helpers give a number,
None, or an InputError naming the file and the tag. Enhanced (multi-frame) MR keeps some
attributes in functional-group sequences: :func:`attribute` looks there too.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from wff.ensemble.types import InputError

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


def number(value) -> float | None:
    """A DS/IS value (the first of several) as a float; None when absent, empty or not a number."""
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def integer(value) -> int | None:
    """An IS/US value as an int; None when absent or not an integer."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def header_int(name: str, ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer (IS/US) tag of ``ds``; ``default`` when absent or empty; InputError naming the file and tag when malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        shown = str(value)[:16]  # technical tags only: an integer string, never an identifier
        raise InputError(f"{name}: {keyword} {shown!r} is not an integer; the file's header is malformed, "
                         "send it again from the scanner or PACS") from None
