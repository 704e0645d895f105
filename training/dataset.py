"""Read a dataset in the project's layout (synthetic or real): labels.csv + DICOM + LabelMe.

    DATASET/labels.csv                      patient_id,label,age,location,split
    DATASET/<patient_id>/<series>/<slice>.dcm
    DATASET/<patient_id>/<series>/<slice>.json   LabelMe rectangles (or polygons) for that slice

Patients go through the serving preprocessing (wff.ensemble.dicom_series + preprocess), and
the LabelMe shapes are mapped into detector pixels with the same letterbox scale.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from wff.config import LABELS, LOCATIONS, ImageConfig
from wff.ensemble.dicom_series import read_study_dir
from wff.ensemble.preprocess import prepare_patient
from wff.ensemble.types import AnnotatedPatient, PatientRecord

COLUMNS = ("patient_id", "label", "age", "location", "split")
SPLITS = ("train", "test")


def load_records(dataset: str | Path, split: str | None = None) -> list[PatientRecord]:
    """Rows of DATASET/labels.csv (optionally one split), validated.

    label: benign|malignant (or 0|1); age: years, empty when unknown; location: one of
    config.LOCATIONS; split: train|test; the patient's folder must exist.
    """
    dataset = Path(dataset)
    path = dataset / "labels.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; a dataset needs labels.csv with columns {','.join(COLUMNS)}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {','.join(COLUMNS)}")
        records = []
        for row_no, row in enumerate(reader, start=2):
            where = f"{path}, row {row_no}"
            label = row["label"].strip().lower()
            label = {"0": LABELS[0], "1": LABELS[1]}.get(label, label)  # 0/1 accepted too
            if label not in LABELS:
                raise ValueError(f"{where}, column label: {row['label']!r} is not one of {LABELS} or 0/1")
            location = row["location"].strip().lower()
            if location not in LOCATIONS:
                raise ValueError(f"{where}, column location: {row['location']!r} is not one of {LOCATIONS}")
            row_split = row["split"].strip().lower()
            if row_split not in SPLITS:
                raise ValueError(f"{where}, column split: {row['split']!r} is not one of {SPLITS}")
            try:
                age = float(row["age"]) if row["age"].strip() else float("nan")  # empty = unknown
            except ValueError:
                raise ValueError(f"{where}, column age: {row['age']!r} is not a number of years (or empty)") from None
            folder = dataset / row["patient_id"].strip()
            if not folder.is_dir():
                raise ValueError(f"{where}: patient folder {folder} does not exist")
            if split is None or row_split == split:
                records.append(PatientRecord(row["patient_id"].strip(), LABELS.index(label), age, location, row_split, folder))
    return records


def read_labelme(path: Path) -> list[tuple[str, np.ndarray]]:
    """(label, box x1 y1 x2 y2 in source pixels) per shape; polygons give their bounding box."""
    try:
        data = json.loads(path.read_text())
        shapes = data["shapes"]
        out = []
        for shape in shapes:
            points = np.asarray(shape["points"], np.float32).reshape(-1, 2)
            if len(points) < 2:
                raise ValueError("a shape needs at least two points")
            box = np.array([points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()], np.float32)
            out.append((str(shape.get("label", "")), box))
        return out
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a usable LabelMe file ({e}); expected {{'shapes': [{{'points': [[x1, y1], [x2, y2]]}}]}}") from e


def load_patient(record: PatientRecord, cfg: ImageConfig) -> AnnotatedPatient:
    """DICOM through the serving preprocessing, plus LabelMe boxes in detector pixels per slice."""
    study = read_study_dir(record.path)
    prepared = prepare_patient(study, cfg)
    boxes = []
    for series, scale in zip(study.series, prepared.scales):
        for name in series.files:
            sidecar = (record.path / name).with_suffix(".json")
            shapes = read_labelme(sidecar) if sidecar.exists() else []
            slice_boxes = np.array([box * scale for _, box in shapes], np.float32).reshape(-1, 4)
            boxes.append(slice_boxes)
    return AnnotatedPatient(record, prepared, tuple(boxes))
