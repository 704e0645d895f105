"""The synthetic dataset: layout, tags, labels, and that the reader and loader accept it."""

import csv
import json

import numpy as np
import pydicom
import pytest

from wff.config import SMALL
from wff.ensemble.dicom_series import read_study_dir
from wff.training.dataset import load_patient, load_records, read_labelme
from wff.training.synth import draw_patients, synthesize_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthesize_dataset(tmp_path_factory.mktemp("synth"), 3, 2, seed=1)


class TestDrawPatients:
    def test_paper_proportions_and_ages(self):
        """Paper-size draw: 180/265 train and 90/50 test, malignant patients older on average."""
        patients = draw_patients(445, 140, np.random.default_rng(0))
        train = [p for p in patients if p.split == "train"]
        test = [p for p in patients if p.split == "test"]
        assert sum(p.label for p in train) == 265 and sum(p.label for p in test) == 50
        ages = np.array([p.age for p in patients])
        labels = np.array([p.label for p in patients])
        assert ages[labels == 1].mean() > ages[labels == 0].mean() + 10
        assert 4 <= ages.min() and ages.max() <= 82


class TestDataset:
    def test_layout_and_tags(self, dataset):
        """labels.csv, one folder per patient, 2-4 sagittal series of 11-21 12-bit slices."""
        rows = list(csv.DictReader(open(dataset / "labels.csv")))
        assert [r["split"] for r in rows].count("test") == 2
        for row in rows:
            series = sorted((dataset / row["patient_id"]).iterdir())
            assert 2 <= len(series) <= 4
            for folder in series:
                slices = sorted(folder.glob("*.dcm"))
                assert 11 <= len(slices) <= 21
            ds = pydicom.dcmread(slices[0])
            assert ds.BitsStored == 12 and ds.Modality == "MR" and ds.PatientAge.endswith("Y")
            assert ds.pixel_array.max() <= 4095

    def test_reader_selects_every_series(self, dataset):
        """Every synthetic series is sagittal and recognised."""
        pid = list(csv.DictReader(open(dataset / "labels.csv")))[0]["patient_id"]
        study = read_study_dir(dataset / pid)
        assert study.skipped == () and {s.sequence for s in study.series} >= {"T1", "T2"}

    def test_labelme_boxes_on_adjacent_slices(self, dataset):
        """Tumours are labelled on several adjacent slices with the patient's label."""
        record = load_records(dataset, "train")[0]
        patient = load_patient(record, SMALL.image)
        labelled = [i for i, b in enumerate(patient.boxes) if len(b)]
        assert len(labelled) >= 2
        some = next(record.path.rglob("*.json"))
        ((label, box),) = read_labelme(some)
        assert label == ("malignant" if record.label else "benign") and box[2] > box[0] and box[3] > box[1]


class TestLoadRecords:
    def test_filters_split_and_parses_labels(self, tmp_path):
        """benign/malignant or 0/1; an empty age is NaN; other splits are dropped."""
        for pid in ("P1", "P2", "P3"):
            (tmp_path / pid).mkdir()
        (tmp_path / "labels.csv").write_text(
            "patient_id,label,age,location,split\nP1,malignant,61,lumbar,test\nP2,0,,cervical,test\nP3,benign,40,sacral,train\n"
        )
        records = load_records(tmp_path, "test")
        assert [(r.patient_id, r.label) for r in records] == [("P1", 1), ("P2", 0)]
        assert records[0].age == 61 and np.isnan(records[1].age) and records[0].path == tmp_path / "P1"


class TestLoaderErrors:
    def test_bad_label_names_row_and_column(self, tmp_path):
        """A bad label value names the file, row and column."""
        (tmp_path / "P1").mkdir()
        (tmp_path / "labels.csv").write_text("patient_id,label,age,location,split\nP1,maybe,40,lumbar,train\n")
        with pytest.raises(ValueError, match="row 2, column label"):
            load_records(tmp_path)

    def test_malformed_labelme(self, tmp_path):
        """A LabelMe file without shapes is refused with its path."""
        (tmp_path / "a.json").write_text(json.dumps({"nope": 1}))
        with pytest.raises(ValueError, match="a.json"):
            read_labelme(tmp_path / "a.json")
