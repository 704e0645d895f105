"""Read a dataset in the project's layout (synthetic or real): labels.csv + DICOM + LabelMe.

    DATASET/labels.csv                          patient_id,label,age,location,split
    DATASET/<patient_id>/<series>/<slice>.dcm   any folder names and depth below the patient
    DATASET/<patient_id>/<series>/<slice>.json  LabelMe rectangles (or polygons) for that slice

``label`` is benign | malignant (or 0 | 1), ``location`` one or more of config.LOCATIONS joined
by ';' (main one first; wff.records), ``split`` train | test, ``age`` in years (empty when
unknown: diagnosed without the age term). The LabelMe shapes of every tumour are boxes, a
second location's lesion as well. Patients go through the serving preprocessing (wff.ensemble.dicom_series and
preprocess), and the LabelMe shapes are mapped into detector pixels with the same letterbox
scale, so training sees exactly what serving sees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from wff.config import ImageConfig
from wff.ensemble.dicom_series import read_study_dir
from wff.ensemble.preprocess import prepare_patient
from wff.ensemble.types import AnnotatedPatient, InputError, PatientRecord
from wff.records import load_records  # noqa: F401 (labels.csv is read as wff evaluate reads it; re-exported for train.py)

log = logging.getLogger(__name__)

BOX_SHAPES = ("rectangle", "polygon", "circle")  # LabelMe shape types that outline a region


def read_labelme(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """(label, box) per region shape of a LabelMe file; box (4,) float32 x1, y1, x2, y2 in source pixels.

    Rectangles give their corners (in any order), polygons their bounding box, circles
    (centre, point on the circle) their bounding square. Points, lines and line strips mark
    no region and are ignored. Raises ValueError naming the file when it is not LabelMe JSON.
    """
    path = Path(path)
    try:
        shapes = json.loads(path.read_text())["shapes"]
        out = []
        for i, shape in enumerate(shapes):
            kind = shape.get("shape_type") or "polygon"  # LabelMe < 4 wrote polygons without a type
            if kind not in BOX_SHAPES:
                log.debug("%s: shape %d (%s) marks no region, ignored", path, i, kind)
                continue
            points = np.asarray(shape["points"], np.float32).reshape(-1, 2)
            if len(points) < 2 or not np.isfinite(points).all():
                raise ValueError(f"shape {i} ({kind}) needs at least two finite points")
            if kind == "circle":
                radius = float(np.hypot(*(points[1] - points[0])))
                points = np.array([points[0] - radius, points[0] + radius], np.float32)
            box = np.array([points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()], np.float32)
            out.append((str(shape.get("label", "")), box))
        return out
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"{path}: not a usable LabelMe file ({type(e).__name__}: {e}); expected "
            '{"shapes": [{"label": ..., "points": [[x1, y1], [x2, y2]], "shape_type": "rectangle"}]}'
        ) from e


def _slice_boxes(sidecar: Path, scale: float, rows: int, cols: int) -> np.ndarray:
    """(m, 4) float32 boxes of one slice in detector pixels, clipped to the letterboxed image."""
    if not sidecar.is_file():
        return np.zeros((0, 4), np.float32)
    boxes = np.array([box for _, box in read_labelme(sidecar)], np.float32).reshape(-1, 4)
    boxes = np.clip(boxes, 0, np.array([cols, rows, cols, rows], np.float32)) * np.float32(scale)
    keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)  # drop boxes outside the image
    return boxes[keep]


def load_patient(record: PatientRecord, image_cfg: ImageConfig) -> AnnotatedPatient:
    """DICOM through the serving preprocessing, plus the LabelMe boxes of every slice in detector pixels.

    boxes[i] belongs to prepared.slices[i]: (m, 4) float32 x1, y1, x2, y2, (0, 4) without a
    LabelMe file. Reading errors name the patient folder and the file.
    """
    try:
        study = read_study_dir(record.path)
    except InputError as e:
        raise InputError(f"patient {record.patient_id} ({record.path}): {e}") from e
    prepared = prepare_patient(study, image_cfg)
    boxes = []
    for series, scale in zip(study.series, prepared.scales):
        _, rows, cols = series.pixels.shape
        for name in series.files:
            boxes.append(_slice_boxes((record.path / name).with_suffix(".json"), scale, rows, cols))
    return AnnotatedPatient(record, prepared, tuple(boxes))


def iter_patients(records: Sequence[PatientRecord], image_cfg: ImageConfig,
                  progress: Callable[[int, int], None] | None = None) -> Iterator[AnnotatedPatient]:
    """load_patient for each record in order; ``progress(done, total)`` after each patient."""
    for i, record in enumerate(records, 1):
        patient = load_patient(record, image_cfg)
        if progress is not None:
            progress(i, len(records))
        yield patient
