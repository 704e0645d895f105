"""The patients of a dataset: DATASET/labels.csv, one row per patient folder.

    DATASET/labels.csv      patient_id,label,age,location,split
    DATASET/<patient_id>/   the patient's DICOM files, any folder names and depth below it

``label`` is benign | malignant (or 0 | 1), ``location`` one or more of config.LOCATIONS joined
by ';' (a patient with tumours at two vertebral locations, e.g. ``cervical;thoracic``, main one
first; the paper counts 677 locations in 585 patients), ``split`` train | test, ``age`` in
years (empty when unknown: diagnosed without the age term). Read by training
(wff.training.dataset) and by the client's evaluation (wff evaluate, soak, bench).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from wff.config import LABELS, LOCATIONS
from wff.ensemble.types import PatientRecord

COLUMNS = ("patient_id", "label", "age", "location", "split")
SPLITS = ("train", "test")
MAX_AGE = 120.0
LABEL_ALIASES = {"0": LABELS[0], "1": LABELS[1]}  # labels may also be written 0 (benign) / 1 (malignant)
LOCATION_SEPARATOR = ";"  # between the locations of one patient in the location column


def _field(row: dict, column: str, allowed: Sequence[str], where: str) -> str:
    value = (row.get(column) or "").strip().lower()
    if value not in allowed:
        raise ValueError(f"{where}, column {column}: {row.get(column)!r} is not one of {', '.join(allowed)}")
    return value


def _locations(row: dict, where: str) -> tuple[str, ...]:
    """The location column: one or more of config.LOCATIONS joined by ';', each once."""
    raw = row.get("location") or ""
    names = [part.strip().lower() for part in raw.split(LOCATION_SEPARATOR)]
    for name in names:
        if name not in LOCATIONS:
            raise ValueError(
                f"{where}, column location: {name!r}{f' (in {raw!r})' if len(names) > 1 else ''} is not one of {', '.join(LOCATIONS)}; "
                f"write one location or several joined by {LOCATION_SEPARATOR!r}, e.g. 'cervical;thoracic'"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}, column location: {raw!r} names {', '.join(repeated)} twice; name each location once")
    return tuple(names)


def load_records(dataset_dir: str | Path, split: str | None = None) -> list[PatientRecord]:
    """Rows of DATASET/labels.csv (optionally only one split), validated, in file order.

    Raises FileNotFoundError without labels.csv, and ValueError naming the file, row and
    column for a missing column, a bad label/location/split/age, a location named twice, a duplicate patient_id or a
    missing patient folder.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    dataset = Path(dataset_dir)
    path = dataset / "labels.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a dataset needs labels.csv with columns {','.join(COLUMNS)}")
    records, seen = [], set()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {', '.join(missing)}; expected a header with {','.join(COLUMNS)}")
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            where = f"{path}, row {row_no}"
            patient_id = (row["patient_id"] or "").strip()
            if not patient_id or "/" in patient_id or "\\" in patient_id or patient_id.startswith("."):
                raise ValueError(f"{where}, column patient_id: {row['patient_id']!r} is not a patient folder name")
            if patient_id in seen:
                raise ValueError(f"{where}, column patient_id: {patient_id!r} appears twice")
            seen.add(patient_id)
            label = _field({**row, "label": LABEL_ALIASES.get((row.get("label") or "").strip(), row.get("label"))}, "label", LABELS, where)
            locations = _locations(row, where)
            row_split = _field(row, "split", SPLITS, where)
            try:
                age = float(row["age"]) if (row["age"] or "").strip() else float("nan")  # empty = unknown
            except (TypeError, ValueError):
                raise ValueError(f"{where}, column age: {row['age']!r} is not a number of years (or empty when unknown)") from None
            if not (math.isnan(age) or 0 <= age <= MAX_AGE):
                raise ValueError(f"{where}, column age: {age:g} is outside 0-{MAX_AGE:g} years")
            folder = dataset / patient_id
            if not folder.is_dir():
                raise ValueError(f"{where}, column patient_id: patient folder {folder} does not exist")
            if split is None or row_split == split:
                records.append(PatientRecord(patient_id, LABELS.index(label), age, locations, row_split, folder))
    return records
