"""Reading a dataset: labels.csv validation, LabelMe boxes, patients prepared as in serving (wff.training.dataset)."""

import json
import shutil

import numpy as np
import pytest

from wff.config import ImageConfig
from wff.ensemble.dicom_series import read_study_dir
from wff.ensemble.types import AnnotatedPatient, InputError
from wff.training.dataset import iter_patients, load_patient, load_records, read_labelme
from wff.training.synth import synthesize_dataset

HEADER = "patient_id,label,age,location,split\n"
IMAGE = ImageConfig(size=128)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 training + 2 test synthetic patients."""
    return synthesize_dataset(tmp_path_factory.mktemp("dataset") / "data", 2, 2, seed=2)


def labels_file(tmp_path, body, header=HEADER, folders=("P1",)):
    for name in folders:
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "labels.csv").write_text(header + body)
    return tmp_path


def labelme_file(tmp_path, shapes, name="IM0001.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": "IM0001.dcm", "imageData": None}))
    return path


class TestLoadRecords:
    def test_records(self, dataset):
        """Every row becomes a PatientRecord with its folder; split filters."""
        records = load_records(dataset)
        assert [r.split for r in records] == ["train", "train", "test", "test"]
        assert all(r.path == dataset / r.patient_id and r.label in (0, 1) and isinstance(r.age, float) for r in records)
        assert [r.patient_id for r in load_records(dataset, "test")] == [r.patient_id for r in records[2:]]

    def test_case_and_spaces_tolerated(self, tmp_path):
        """Values are trimmed and case-insensitive."""
        (record,) = load_records(labels_file(tmp_path, " P1 , Malignant ,61, Lumbar ,TRAIN\n"))
        assert (record.patient_id, record.label, record.age, record.locations, record.split) == ("P1", 1, 61.0, ("lumbar",), "train")

    def test_several_locations(self, tmp_path):
        """The location column holds one or more locations joined by ';', main one first, order kept."""
        text = "P1,malignant,61,thoracic; Lumbar ,train\nP2,benign,40,sacral,test\n"
        first, second = load_records(labels_file(tmp_path, text, folders=("P1", "P2")))
        assert (first.locations, second.locations) == (("thoracic", "lumbar"), ("sacral",))

    def test_missing_file(self, tmp_path):
        """Without labels.csv the error says which columns it needs."""
        with pytest.raises(FileNotFoundError, match="labels.csv not found.*patient_id,label,age,location,split"):
            load_records(tmp_path)

    def test_missing_column(self, tmp_path):
        """A missing column is named with the file."""
        with pytest.raises(ValueError, match=r"labels.csv: missing columns location"):
            load_records(labels_file(tmp_path, "P1,benign,40,train\n", header="patient_id,label,age,split\n"))

    @pytest.mark.parametrize("row,match", [
        ("P1,maybe,40,lumbar,train", "row 2, column label: 'maybe' is not one of benign, malignant"),
        ("P1,benign,forty,lumbar,train", "row 2, column age: 'forty' is not a number"),
        ("P1,benign,140,lumbar,train", "row 2, column age: 140 is outside"),
        ("P1,benign,40,neck,train", "row 2, column location: 'neck' is not one of cervical"),
        ("P1,benign,40,cervical;neck,train", "row 2, column location: 'neck' \\(in 'cervical;neck'\\) is not one of cervical"),
        ("P1,benign,40,cervical;,train", "row 2, column location: '' \\(in 'cervical;'\\) is not one of cervical"),
        ("P1,benign,40,,train", "row 2, column location: '' is not one of cervical"),
        ("P1,benign,40,lumbar;Lumbar,train", "row 2, column location: 'lumbar;Lumbar' names lumbar twice"),
        ("P1,benign,40,lumbar,validation", "row 2, column split: 'validation' is not one of train, test"),
        ("P2,benign,40,lumbar,train", "row 2, column patient_id: patient folder .*P2 does not exist"),
        ("../P1,benign,40,lumbar,train", "row 2, column patient_id: '../P1' is not a patient folder name"),
        ("P1,benign,40,lumbar,train\nP1,malignant,50,lumbar,test", "row 3, column patient_id: 'P1' appears twice"),
    ])
    def test_bad_values_name_file_row_and_column(self, tmp_path, row, match):
        """Each bad value names labels.csv, the row and the column."""
        with pytest.raises(ValueError, match=f"labels.csv, {match}"):
            load_records(labels_file(tmp_path, row + "\n"))

    def test_bad_split_argument(self, dataset):
        """Only train and test splits exist."""
        with pytest.raises(ValueError, match="split 'val'"):
            load_records(dataset, "val")


class TestReadLabelme:
    def test_rectangle_any_corner_order(self, tmp_path):
        """A rectangle drawn bottom-right to top-left gives x1 < x2, y1 < y2."""
        ((label, box),) = read_labelme(labelme_file(tmp_path, [{"label": "benign", "points": [[30, 40], [10, 20]], "shape_type": "rectangle"}]))
        assert label == "benign" and box.tolist() == [10, 20, 30, 40] and box.dtype == np.float32

    def test_polygon_circle_and_points(self, tmp_path):
        """Polygons give their bounding box, circles their bounding square; points mark no region."""
        shapes = [
            {"label": "m", "points": [[5, 9], [12, 3], [8, 15]], "shape_type": "polygon"},
            {"label": "m", "points": [[20, 20], [23, 24]], "shape_type": "circle"},
            {"label": "m", "points": [[1, 1]], "shape_type": "point"},
        ]
        boxes = [box.tolist() for _, box in read_labelme(labelme_file(tmp_path, shapes))]
        assert boxes == [[5, 3, 12, 15], [15, 15, 25, 25]]

    @pytest.mark.parametrize("text", ['{"nope": 1}', "{not json", '{"shapes": [{"points": [[1, 2]], "shape_type": "rectangle"}]}',
                                      '{"shapes": [{"shape_type": "rectangle"}]}'])
    def test_malformed(self, tmp_path, text):
        """Unusable LabelMe files are refused with their path."""
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match="bad.json: not a usable LabelMe file"):
            read_labelme(tmp_path / "bad.json")


class TestLoadPatient:
    def test_prepared_with_boxes_per_slice(self, dataset):
        """boxes[i] is slice i's LabelMe rectangle times its series' scale, (0, 4) without a sidecar."""
        record = load_records(dataset)[0]
        patient = load_patient(record, IMAGE)
        assert isinstance(patient, AnnotatedPatient) and patient.record == record
        assert patient.prepared.slices.shape[1:] == (1, 128, 128) and len(patient.boxes) == len(patient.prepared.slices)
        study = read_study_dir(record.path)
        files = [(name, q) for q, s in enumerate(study.series) for name in s.files]
        for boxes, (name, q) in zip(patient.boxes, files):
            assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
            sidecar = (record.path / name).with_suffix(".json")
            expected = [box * patient.prepared.scales[q] for _, box in read_labelme(sidecar)] if sidecar.exists() else []
            np.testing.assert_allclose(boxes, np.array(expected, np.float32).reshape(-1, 4), rtol=1e-6)
        assert sum(len(b) > 0 for b in patient.boxes) >= 2 * len(study.series)

    def test_boxes_inside_the_letterboxed_image(self, dataset):
        """Every box lies within the scaled source image, never in the zero padding."""
        patient = load_patient(load_records(dataset)[1], IMAGE)
        for boxes, q in zip(patient.boxes, patient.prepared.slice_series):
            info = patient.prepared.series_info[q]
            scale = patient.prepared.scales[q]
            assert ((boxes[:, 2] <= info["cols"] * scale + 1e-4) & (boxes[:, 3] <= info["rows"] * scale + 1e-4)).all()
            assert ((boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])).all()

    def test_malformed_sidecar_names_the_file(self, dataset, tmp_path):
        """A broken LabelMe file beside a slice fails the patient with the file's path."""
        record = load_records(dataset)[2]
        copy = tmp_path / record.patient_id
        shutil.copytree(record.path, copy)
        sidecar = sorted(copy.rglob("*.json"))[0]
        sidecar.write_text("{broken")
        with pytest.raises(ValueError, match=f"{sidecar.name}: not a usable LabelMe file"):
            load_patient(type(record)(record.patient_id, record.label, record.age, record.locations, record.split, copy), IMAGE)

    def test_bad_dicom_names_patient_and_file(self, dataset, tmp_path):
        """An unreadable DICOM fails with the patient folder and the file name."""
        record = load_records(dataset)[3]
        copy = tmp_path / record.patient_id
        shutil.copytree(record.path, copy)
        victim = sorted(copy.rglob("*.dcm"))[0]
        victim.write_bytes(b"not dicom at all" * 10)
        bad = type(record)(record.patient_id, record.label, record.age, record.locations, record.split, copy)
        with pytest.raises(InputError, match=f"patient {record.patient_id} .*{victim.parent.name}/{victim.name}: not a DICOM file"):
            load_patient(bad, IMAGE)

    def test_iter_patients_reports_progress(self, dataset):
        """iter_patients yields patients in order and reports (done, total)."""
        records = load_records(dataset, "test")
        seen = []
        patients = list(iter_patients(records, IMAGE, progress=lambda done, total: seen.append((done, total))))
        assert [p.record for p in patients] == records and seen == [(1, 2), (2, 2)]


class TestLoadRecordsForms:
    def test_numeric_labels_and_unknown_age(self, tmp_path):
        """Labels 0/1 are accepted and an empty age is NaN (no age term)."""
        for pid in ("P1", "P2"):
            (tmp_path / pid).mkdir()
        (tmp_path / "labels.csv").write_text("patient_id,label,age,location,split\nP1,1,61,lumbar,test\nP2,0,,cervical,test\n")
        records = load_records(tmp_path, "test")
        assert [(r.patient_id, r.label) for r in records] == [("P1", 1), ("P2", 0)]
        assert records[0].age == 61 and np.isnan(records[1].age)
