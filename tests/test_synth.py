"""The synthetic dataset: composition, difficulty, DICOM tags, LabelMe files and the CLI."""

import csv
import dataclasses
import json

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from wff.config import LOCATIONS, ImageConfig
from wff.ensemble.dicom_series import read_study_dir
from wff.records import load_records
from wff.training.data_cli import data
from wff.training.dataset import load_patient
from wff.training.synth import (
    LOCATION_CASES, class_counts, draw_patients, draw_signal_attributes, generate_patients, location_mix, make_anatomy,
    observer_accuracy, plan_series, render_series, synthesize_dataset, write_patient,
)

LABELME_KEYS = {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}
SHAPE_KEYS = {"label", "points", "group_id", "description", "shape_type", "flags"}
SEED = 5  # the fixture's draw: SYN0002 sacral;lumbar and SYN0003 cervical;thoracic have two locations
TABLE2_SHARE = {loc: n / sum(LOCATION_CASES.values()) for loc, n in LOCATION_CASES.items()}  # of 677 locations


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 training + 2 test patients, seed SEED (two of them with two locations)."""
    return synthesize_dataset(tmp_path_factory.mktemp("synth") / "data", 2, 2, seed=SEED)


def rows(dataset):
    return list(csv.DictReader(open(dataset / "labels.csv")))


class TestComposition:
    def test_paper_counts(self):
        """Paper size: 180/265 benign/malignant training and 90/50 test patients, ids SYN0001..SYN0585."""
        patients = draw_patients(445, 140, np.random.default_rng(0))
        for split, (benign, malignant) in (("train", (180, 265)), ("test", (90, 50))):
            labels = [p.label for p in patients if p.split == split]
            assert (labels.count(0), labels.count(1)) == (benign, malignant)
        assert [p.patient_id for p in patients[:2]] == ["SYN0001", "SYN0002"] and patients[-1].patient_id == "SYN0585"

    @pytest.mark.parametrize("n,split,expected", [(120, "train", (49, 71)), (60, "test", (39, 21)), (8, "train", (3, 5)), (6, "test", (4, 2)), (2, "test", (1, 1))])
    def test_scaled_counts_keep_both_classes(self, n, split, expected):
        """Smaller splits keep the paper's proportions and at least one patient per class."""
        assert class_counts(n, split) == expected

    def test_ages_follow_fig5(self):
        """Mean 48 +- 18 in 4-82; malignancy under 20 % below 30, about half in the forties, nearly all from 70."""
        patients = draw_patients(4450, 1400, np.random.default_rng(1))
        ages = np.array([p.age for p in patients])
        labels = np.array([p.label for p in patients])
        assert 46 <= ages.mean() <= 50 and 15 <= ages.std() <= 20 and ages.min() >= 4 and ages.max() <= 82
        assert labels[ages < 30].mean() < 0.3
        assert 0.3 <= labels[(ages >= 40) & (ages < 50)].mean() <= 0.6
        assert labels[ages >= 70].mean() > 0.8

    def test_locations_and_sex(self):
        """Locations follow Table 2 (cervical most, sacral rarest); both sexes appear."""
        patients = draw_patients(445, 140, np.random.default_rng(2))
        counts = {loc: sum(loc in p.locations for p in patients) for loc in LOCATIONS}
        assert counts["cervical"] > counts["thoracic"] > counts["sacral"] and counts["lumbar"] > counts["sacral"] > 0
        assert 0.45 < np.mean([p.sex == "M" for p in patients]) < 0.67

    def test_location_mix_gives_table2_exactly(self):
        """Per 585 patients the mix expects 92 with two locations and 297/182/174/24 locations. The pairs
        by hand: 92 x 297*182 / (297*182 + 182*174 + 174*24) = 55.32 cervicothoracic, 32.41 thoracolumbar,
        4.27 lumbosacral; cervical alone 297 - 55.32 = 241.68."""
        mix = {locs: 585 * p for locs, p in location_mix().items()}
        assert sum(mix.values()) == pytest.approx(585)
        assert sum(n for locs, n in mix.items() if len(locs) == 2) == pytest.approx(92)
        for loc, n in LOCATION_CASES.items():
            assert sum(n_set for locs, n_set in mix.items() if loc in locs) == pytest.approx(n)

        def pair(a, b):
            return mix[(a, b)] + mix[(b, a)]

        assert (pair("cervical", "thoracic"), pair("thoracic", "lumbar"), pair("lumbar", "sacral")) == pytest.approx((55.318, 32.408, 4.274), abs=0.001)
        assert mix[("cervical",)] == pytest.approx(241.682, abs=0.001)
        assert mix[("cervical", "thoracic")] / pair("cervical", "thoracic") == pytest.approx(297 / (297 + 182))

    def test_second_locations_on_a_large_draw(self):
        """20,000 patients: 92/585 = 15.7 % have two locations (binomial SD 0.26 %), always neighbouring
        regions and never the same twice; each region's share of all locations is Table 2's (297/677 ...)."""
        patients = draw_patients(15000, 5000, np.random.default_rng(6))
        two = [p.locations for p in patients if len(p.locations) == 2]
        assert all(len(p.locations) in (1, 2) for p in patients)
        assert len(two) / len(patients) == pytest.approx(92 / 585, abs=0.01)
        assert all(abs(LOCATIONS.index(a) - LOCATIONS.index(b)) == 1 for a, b in two)
        located = [loc for p in patients for loc in p.locations]
        for loc, share in TABLE2_SHARE.items():
            assert located.count(loc) / len(located) == pytest.approx(share, abs=0.01), loc

    def test_ids_do_not_reveal_the_class(self):
        """Within a split, labels are shuffled rather than benign first."""
        labels = [p.label for p in draw_patients(40, 20, np.random.default_rng(3)) if p.split == "train"]
        assert labels != sorted(labels)


class TestDifficulty:
    def test_ideal_observer(self):
        """All series ~0.88 (0.84-0.90), T2/STIR better than T1, one slice clearly worse, z itself ~0.91."""
        acc = observer_accuracy(2000, seed=0)
        assert 0.84 <= acc["all_series"] <= 0.90
        assert acc["T1_only"] + 0.04 <= acc["T2_STIR_only"] <= acc["all_series"] + 0.01
        assert acc["single_slice"] <= acc["all_series"] - 0.05
        assert 0.89 <= acc["z_known"] <= 0.94

    @pytest.mark.parametrize("sequence,brighter", [("T1", False), ("T2", True), ("STIR", True)])
    def test_tumour_unlike_marrow(self, sequence, brighter):
        """With neutral attributes the tumour is darker than normal marrow on T1, brighter on T2/STIR, on adjacent slices."""
        patient = draw_patients(2, 2, np.random.default_rng(4))[0]
        rng = np.random.default_rng(5)
        anatomy = make_anatomy(patient, rng)
        plan = dataclasses.replace(plan_series(patient, anatomy, rng)[0], sequence=sequence, noise=0.0)
        pixels, boxes = render_series(anatomy, plan, np.zeros((len(plan.positions), 4), np.float32), rng)
        labelled = [k for k, b in enumerate(boxes) if b]
        assert len(labelled) >= 2 and labelled == list(range(labelled[0], labelled[-1] + 1))
        k = labelled[len(labelled) // 2]
        x1, y1, x2, y2 = (int(v) for v in boxes[k][0][:4])
        tumour = np.median(pixels[k, y1:y2, x1:x2])
        busy = {anatomy.tumour.level} | {s.level for s in anatomy.satellites} | ({anatomy.second.level} if anatomy.second else set())
        v_mid = plan.v0 + plan.rows * plan.spacing / 2
        normal = min((lv for i, lv in enumerate(anatomy.levels) if i not in busy), key=lambda lv: abs(lv.cv - v_mid))
        row, col = int((normal.cv - plan.v0) / plan.spacing), int((normal.cu - plan.u0) / plan.spacing)
        marrow = np.median(pixels[k, row - 2:row + 3, col - 2:col + 3])
        assert (tumour > marrow) == brighter


class TestSecondLocation:
    @pytest.mark.parametrize("locations", [("cervical", "thoracic"), ("thoracic", "cervical"), ("thoracic", "lumbar"),
                                           ("lumbar", "thoracic"), ("lumbar", "sacral"), ("sacral", "lumbar")])
    def test_second_tumour_in_the_next_region_and_labelled(self, locations):
        """The second tumour sits 1-3 levels towards the second region (in the sacrum for a sacral one,
        above it for a lumbar one below a sacral tumour), inside every series' field of view, drawn
        with the main tumour's size rule, and boxed with its location on some slices."""
        patient = dataclasses.replace(draw_patients(2, 2, np.random.default_rng(7))[1], locations=locations)
        rng = np.random.default_rng([7, patient.index])
        anatomy = make_anatomy(patient, rng)
        second, tumour = anatomy.second, anatomy.tumour
        step = second.level - tumour.level
        assert (second.location, tumour.location) == (locations[1], locations[0])
        assert 1 <= abs(step) <= 3 and np.sign(step) == np.sign(LOCATIONS.index(locations[1]) - LOCATIONS.index(locations[0]))
        sacrum = [i for i, lv in enumerate(anatomy.levels) if lv.cv > anatomy.kink_v]  # S1 and below
        assert (second.level in sacrum) == (locations[1] == "sacral") and (tumour.level in sacrum) == (locations[0] == "sacral")
        assert second.level not in {s.level for s in anatomy.satellites}
        plans = plan_series(patient, anatomy, rng)
        seen = set()
        for plan, attrs in zip(plans, draw_signal_attributes(patient.z, plans, rng)):
            for lesion in (tumour, second):
                assert plan.v0 < anatomy.levels[lesion.level].cv < plan.v0 + plan.rows * plan.spacing
            _, boxes = render_series(anatomy, plan, attrs, rng)
            seen |= {box[4] for slice_boxes in boxes for box in slice_boxes}
        assert seen == set(locations)

    def test_one_location_has_no_second_tumour(self):
        """A single-location patient keeps one tumour."""
        patient = dataclasses.replace(draw_patients(2, 2, np.random.default_rng(7))[0], locations=("lumbar",))
        assert make_anatomy(patient, np.random.default_rng(1)).second is None

    def test_every_location_is_labelled_and_read(self, dataset):
        """labels.csv lists each patient's locations (two for SYN0002 and SYN0003), load_records reads them,
        every location appears as a LabelMe description of that patient's boxes, and training gets one
        box per LabelMe shape."""
        records = {r.patient_id: r for r in load_records(dataset)}
        assert records["SYN0002"].locations == ("sacral", "lumbar") and records["SYN0003"].locations == ("cervical", "thoracic")
        for row in rows(dataset):
            shapes = [s for f in (dataset / row["patient_id"]).rglob("*.json") for s in json.loads(f.read_text())["shapes"]]
            assert {s["description"] for s in shapes} == set(row["location"].split(";")), row["patient_id"]
        patient = load_patient(records["SYN0003"], ImageConfig(size=128))
        n_shapes = sum(len(json.loads(f.read_text())["shapes"]) for f in (dataset / "SYN0003").rglob("*.json"))
        assert sum(len(b) for b in patient.boxes) == n_shapes


class TestDataset:
    def test_layout(self, dataset):
        """labels.csv with the documented columns; one folder per patient with 2-4 series of 11-21 slices."""
        table = rows(dataset)
        assert list(table[0]) == ["patient_id", "label", "age", "location", "split"]
        assert [r["split"] for r in table] == ["train", "train", "test", "test"]
        assert {r["label"] for r in table if r["split"] == "test"} == {"benign", "malignant"}
        for row in table:
            assert set(row["location"].split(";")) <= set(LOCATIONS) and 4 <= int(row["age"]) <= 82
            series = sorted((dataset / row["patient_id"]).iterdir())
            assert 2 <= len(series) <= 4
            for folder in series:
                assert 11 <= len(list(folder.glob("*.dcm"))) <= 21
                assert folder.name.split("_")[1] in ("T1", "T2", "STIR")

    def test_dicom_tags(self, dataset):
        """A slice carries the MR image tags the brief lists, 12-bit in 16, explicit VR little endian."""
        row = rows(dataset)[0]
        folder = sorted((dataset / row["patient_id"]).iterdir())[0]
        ds = pydicom.dcmread(folder / "IM0001.dcm")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "MR" and ds.PatientID == row["patient_id"] and str(ds.PatientName) == f"Synthetic^{row['patient_id'][3:]}"
        assert ds.PatientAge == f"{int(row['age']):03d}Y" and ds.PatientSex in ("M", "F")
        assert list(ds.ImageOrientationPatient) == [0, 1, 0, 0, 0, -1] and list(ds.ImageType[:2]) == ["ORIGINAL", "PRIMARY"]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and (ds.RescaleSlope, ds.RescaleIntercept) == (1, 0)
        assert 3 <= ds.SliceThickness <= 7 and ds.SpacingBetweenSlices >= ds.SliceThickness
        assert ds.pixel_array.max() <= 4095 and (ds.Rows, ds.Columns) in ((256, 256), (320, 320), (256, 224), (320, 256))
        assert ds.RepetitionTime > 0 and ds.EchoTime > 0 and ds.SeriesDescription

    def test_uids_and_positions(self, dataset):
        """UIDs are unique per instance and shared per series; positions step along x by SpacingBetweenSlices."""
        patient = dataset / rows(dataset)[0]["patient_id"]
        sops, series_uids, study_uids = set(), set(), set()
        for folder in sorted(patient.iterdir()):
            files = sorted(folder.glob("*.dcm"))
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            sops |= {h.SOPInstanceUID for h in headers}
            series_uids |= {h.SeriesInstanceUID for h in headers}
            study_uids |= {h.StudyInstanceUID for h in headers}
            xs = np.array([float(h.ImagePositionPatient[0]) for h in headers])
            np.testing.assert_allclose(np.abs(np.diff(xs)), float(headers[0].SpacingBetweenSlices), atol=1e-3)
        assert len(sops) == sum(len(list(f.glob("*.dcm"))) for f in patient.iterdir())
        assert len(series_uids) == len(list(patient.iterdir())) and len(study_uids) == 1

    def test_labelme_sidecars(self, dataset):
        """LabelMe 5 rectangles with the patient's label beside 2-12 adjacent slices of each series."""
        for row in rows(dataset):
            for folder in (dataset / row["patient_id"]).iterdir():
                sidecars = sorted(folder.glob("*.json"))
                numbers = [int(f.stem[2:]) for f in sidecars]
                assert 2 <= len(sidecars) <= 12 and numbers == list(range(numbers[0], numbers[-1] + 1))
                doc = json.loads(sidecars[0].read_text())
                assert set(doc) == LABELME_KEYS and doc["imagePath"] == sidecars[0].stem + ".dcm" and doc["imageData"] is None
                ds = pydicom.dcmread(folder / doc["imagePath"], stop_before_pixels=True)
                assert (doc["imageHeight"], doc["imageWidth"]) == (ds.Rows, ds.Columns)
                for shape in doc["shapes"]:
                    assert set(shape) == SHAPE_KEYS and shape["shape_type"] == "rectangle" and shape["label"] == row["label"]
                    (x1, y1), (x2, y2) = shape["points"]
                    assert 0 <= x1 < x2 <= ds.Columns and 0 <= y1 < y2 <= ds.Rows

    def test_reader_selects_every_series(self, dataset):
        """Every synthetic series is sagittal and classified as its folder says; PatientAge is read."""
        row = rows(dataset)[0]
        study = read_study_dir(dataset / row["patient_id"])
        assert study.skipped == () and study.patient_age == float(row["age"])
        assert [s.sequence for s in study.series] == [f.name.split("_")[1] for f in sorted((dataset / row["patient_id"]).iterdir())]

    def test_deterministic(self, dataset, tmp_path):
        """The same seed writes the same bytes."""
        patient = draw_patients(2, 2, np.random.default_rng(SEED))[1]  # a two-location patient
        write_patient(tmp_path, patient, seed=SEED)
        for again in sorted((tmp_path / patient.patient_id).rglob("*.*"))[:5]:
            assert again.read_bytes() == (dataset / again.relative_to(tmp_path)).read_bytes()

    def test_labels_written_last(self, tmp_path):
        """labels.csv appears only after the last patient, so an interrupted dataset is recognisable."""
        steps = generate_patients(tmp_path / "d", 2, 2, seed=0)
        next(steps)
        assert not (tmp_path / "d" / "labels.csv").exists()
        assert len(list(steps)) == 3 and (tmp_path / "d" / "labels.csv").exists()


class TestCli:
    def test_synth_json_summary(self, tmp_path):
        """wff data synth --train 2 --test 2 --json - prints a summary (locations as Table 2 counts them) and writes the dataset."""
        result = CliRunner().invoke(data, ["synth", str(tmp_path / "d"), "--train", "2", "--test", "2", "--seed", "5", "--json", "-"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["patients"] == {"train": {"benign": 1, "malignant": 1}, "test": {"benign": 1, "malignant": 1}}
        assert summary["dicom_files"] == len(list((tmp_path / "d").rglob("*.dcm"))) and summary["megabytes"] > 0
        rows = (tmp_path / "d" / "labels.csv").read_text().splitlines()[1:]
        written = [loc for row in rows for loc in row.split(",")[3].split(";")]
        assert summary["locations"] == {loc: written.count(loc) for loc in LOCATIONS}
        assert summary["patients_with_two_or_more_locations"] == sum(";" in row.split(",")[3] for row in rows) > 0  # seed 5 has some
        assert f"{len(written)} tumour locations" in result.stderr
        assert "wrote 2 training" in result.stderr

    def test_refuses_existing_dataset(self, dataset):
        """An existing dataset is not overwritten: exit 1 with the one error format."""
        result = CliRunner().invoke(data, ["synth", str(dataset), "--size", "tiny"])
        assert result.exit_code == 1 and "wff: error:" in result.stderr and "already holds a dataset" in result.stderr

    def test_refuses_one_patient_split(self, tmp_path):
        """A split needs a patient per class."""
        result = CliRunner().invoke(data, ["synth", str(tmp_path / "d"), "--train", "1"])
        assert result.exit_code == 2 and "--train" in result.output
