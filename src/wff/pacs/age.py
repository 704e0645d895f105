"""The patient's age at the study, in years, from the study's own DICOM headers.

In order: (0010,1010) PatientAge as a DICOM age string (``nnnY``, ``nnnM``, ``nnnW``, ``nnnD``),
else (0008,0020) StudyDate minus (0010,0030) PatientBirthDate, else None: the fusion then
leaves the age term out. An age outside [0, max_age] counts as unknown, as the server would
refuse it. The value is passed to the server explicitly, so the gateway and ``wff diagnose
--age`` send the same thing.
"""

from __future__ import annotations

import datetime as dt
import io
import struct
from collections.abc import Iterable, Sequence

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from wff.config import AgePriorConfig
from wff.ensemble.dicom_series import parse_age
from wff.ensemble.types import InputError

DAYS_PER_YEAR = 365.25
AGE_TAGS = ("PatientAge", "PatientBirthDate", "StudyDate")
# what pydicom raises on a malformed header
HEADER_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError, struct.error)
SOURCES = ("PatientAge", "StudyDate - PatientBirthDate", "none")  # what decided the age, for the audit log


def parse_da(text) -> dt.date | None:
    """A DICOM DA value (``YYYYMMDD``; the old ``YYYY.MM.DD`` form too) -> date, None if empty or not a date."""
    value = str(text or "").strip().replace(".", "")
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def dataset_age(ds: Dataset, max_age: float = AgePriorConfig().max_age) -> tuple[float | None, str]:
    """(age in years or None, source) of one data set; source is one of :data:`SOURCES`."""
    text = ds.get("PatientAge")
    if text:
        try:
            age = parse_age(str(text))
        except InputError:
            age = None
        if age is not None and 0 <= age <= max_age:
            return age, SOURCES[0]
    birth, study = parse_da(ds.get("PatientBirthDate")), parse_da(ds.get("StudyDate"))
    if birth is not None and study is not None:
        age = (study - birth).days / DAYS_PER_YEAR
        if 0 <= age <= max_age:
            return age, SOURCES[1]
    return None, SOURCES[2]


def study_age(datasets: Iterable[Dataset], max_age: float = AgePriorConfig().max_age) -> tuple[float | None, str]:
    """(age, source) of the first data set that gives one (PatientAge preferred over dates in each)."""
    for ds in datasets:
        age, source = dataset_age(ds, max_age)
        if age is not None:
            return age, source
    return None, SOURCES[2]


def files_age(files: Sequence[tuple[str, bytes]], max_age: float = AgePriorConfig().max_age) -> tuple[float | None, str]:
    """(age, source) from DICOM files as (name, bytes); only the three tags are read, unreadable files are passed over."""
    headers = []
    for _, data in files:
        try:
            headers.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(AGE_TAGS)))
        except HEADER_ERRORS:  # a file pydicom cannot parse gives no age; the server names what is wrong with it
            continue
    return study_age(headers, max_age)
