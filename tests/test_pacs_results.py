"""DICOM results of a diagnosis: deterministic UIDs (wff.pacs.uids), key slices and boxes in source
pixels (wff.pacs.keyslice), the TID 1500 SR and the presentation state (wff.pacs.results) read back
with highdicom and checked with dciodvfy, the served model's digest, and ``wff diagnose --sr``
against a real tritonserver.

Diagnoses come from the in-process pipeline over conftest's stand-in models (every slice gets the
boxes (s/4, s/4, s/2, s/2) with score 0.9 and (s/8, s/8, s/2, 3s/4) with 0.6 at s = 64, D = the
slice's mean intensity), or are written by hand where a test needs a particular key slice.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from conftest import TINY, dicom_slice, embedded_server, make_classifier_onnx, write_dicom_patient
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid
from test_dicom_series import enhanced_mr_bytes

from wff.cli import main
from wff.client.grpc_client import DiagnosisClient, DiagnosisError, identity_from_configs, read_patient_files
from wff.contracts import ENSEMBLE_NAME
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.dicom_series import read_study
from wff.ensemble.pipeline import Pipeline
from wff.ensemble.preprocess import series_info
from wff.pacs import keyslice, results, uids
from wff.serving.repository import MODEL_DIGEST_KEY, WFF_VERSION_KEY, build_repository, model_digest, read_config

DIGEST = "sha256:" + "0123456789abcdef" * 4
SETTINGS = results.ResultSettings(model_version="9.9.9", model_digest=DIGEST, detector_size=TINY.image.size)
UID_FORM = re.compile(r"[1-9][0-9]*(\.(0|[1-9][0-9]*))+")
DCIODVFY = "/usr/bin/dciodvfy"


def dcm_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read_folder(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(data)) for _, data in read_patient_files(folder)]


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's output lines for ``path`` (it writes them to stderr)."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return (run.stdout + run.stderr).splitlines()


def hand_diagnosis(datasets, scores, boxes, d=None, votes=None, label="malignant", p=0.75) -> Diagnosis:
    """A diagnosis of ``datasets`` as the server would describe them, with the given per-slice best-box
    scores, boxes (detector pixels) and D (default 0.8 where the score is > 0, NaN elsewhere)."""
    study = read_study([(str(i), dcm_bytes(ds)) for i, ds in enumerate(datasets)])
    info = tuple(series_info(q, s) for q, s in enumerate(study.series))
    owners = np.concatenate([np.full(len(s.files), q, np.int32) for q, s in enumerate(study.series)])
    scores = np.asarray(scores, np.float32)
    d = np.where(scores > 0, 0.8, np.nan).astype(np.float32) if d is None else np.asarray(d, np.float32)
    q = len(info)
    return Diagnosis(label=label, p_malignant=p, series_votes=np.asarray(votes if votes is not None else [1] * q, np.int32),
                     series_m=np.full(q, 0.6, np.float32), series_info=info, series_regions=np.zeros((q, 5), np.float32),
                     slice_d=d, slice_score=scores, slice_box=np.asarray(boxes, np.float32).reshape(-1, 4), slice_series=owners,
                     age_a=float("nan"), age_used=float("nan"), notes={})


def shuffled_series(folder: Path, rows: int, cols: int, n: int) -> list[pydicom.Dataset]:
    """One sagittal series of ``n`` rows x cols slices, slice k at x = 4k mm (InstanceNumber k + 1),
    written under file names whose order is neither InstanceNumber nor position order."""
    study_uids = {"study": generate_uid(), 1: generate_uid()}
    names = [f"IM{(7 * k + 3) % n:02d}.dcm" for k in range(n)]  # n = 6: slice k in IM03, IM04, IM05, IM00, IM01, IM02
    for k in range(n):
        pixels = np.full((rows, cols), 100 + 10 * k)
        (folder / names[k]).write_bytes(dicom_slice(pixels, 1, "SAG T2", k, 50, study_uids))
    return read_folder(folder)


# ----------------------------------------------------------------------------------------------- UIDs


class TestUids:
    def test_default_root_is_pydicoms_hash_of_the_name(self):
        """The default root is pydicom's root plus 12 digits of generate_uid(entropy_srcs=["spine-wff"])."""
        made = generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["spine-wff"])
        assert uids.DEFAULT_UID_ROOT == made[: len(PYDICOM_ROOT_UID) + 12]

    def test_form(self):
        """Every UID is at most 64 characters, digits and dots, no leading zeros, under the root, all distinct."""
        made = uids.result_uids(uids.DEFAULT_UID_ROOT, "1.2.3", ["1.2.3.4", "1.2.3.5"], "0.1.0", DIGEST)
        values = list(vars(made).values())
        assert len(set(values)) == len(values)
        for uid in values:
            assert len(uid) <= 64 and UID_FORM.fullmatch(uid) and uids.is_own_uid(uid, uids.DEFAULT_UID_ROOT), uid

    def test_same_input_same_uids(self):
        """The instances in another order give the same UIDs; a resend is the same result."""
        a = uids.result_uids("1.2.3", "9.8", ["1.1", "1.2", "1.3"], "0.1.0", DIGEST)
        assert a == uids.result_uids("1.2.3", "9.8", ["1.3", "1.1", "1.2"], "0.1.0", DIGEST)

    @pytest.mark.parametrize("change", ["one more instance", "other model", "other version", "other study", "other root"])
    def test_other_input_other_uids(self, change):
        """One more instance, another model digest or version, study or root: every UID changes."""
        args = {"root": "1.2.3", "study_uid": "9.8", "sop_instance_uids": ["1.1", "1.2"], "model_version": "0.1.0", "model_digest": DIGEST}
        other = dict(args)
        if change == "one more instance":
            other["sop_instance_uids"] = ["1.1", "1.2", "1.3"]
        elif change == "other model":
            other["model_digest"] = "sha256:" + "f" * 64
        elif change == "other version":
            other["model_version"] = "0.2.0"
        elif change == "other study":
            other["study_uid"] = "9.9"
        else:
            other["root"] = "1.2.4"
        a, b = uids.result_uids(**args), uids.result_uids(**other)
        for kind in ("sr_series", "sr_instance", "pr_series", "pr_instance"):
            assert getattr(a, kind) != getattr(b, kind), kind
        assert (a.device != b.device) == (change in ("other model", "other version", "other root"))

    @pytest.mark.parametrize("root, why", [
        ("1.2.03", "leading zeros"), ("1.2.3.", "trailing dot"), ("1..2", "empty component"), ("1.2.a", "digits and dots"),
        ("1." + "2" * 50, "at most 43"),
    ])
    def test_bad_root(self, root, why):
        """A root that cannot prefix a valid 64-character UID is refused, saying why."""
        with pytest.raises(ValueError, match=why):
            uids.check_uid_root(root)

    def test_no_instances(self):
        with pytest.raises(ValueError, match="no SOP Instance UIDs"):
            uids.result_uids("1.2.3", "9.8", [], "0.1.0", DIGEST)

    def test_own_uid(self):
        """Only UIDs below the root (not merely sharing its digits) are the gateway's own."""
        assert uids.is_own_uid("1.2.3.4", "1.2.3") and not uids.is_own_uid("1.2.34.5", "1.2.3") and not uids.is_own_uid("1.2.3", "1.2.3")


# ------------------------------------------------------------------------------------------ key slices


class TestSourceBox:
    def test_scale(self):
        """96 x 128 letterboxed to 64: 0.5 detector pixels per source pixel (the longer side decides)."""
        assert keyslice.letterbox_scale(64, 96, 128) == 0.5
        assert keyslice.letterbox_scale(64, 48, 48) == pytest.approx(4 / 3)

    def test_box_divided_by_scale(self):
        """Scale 0.5: detector (8, 4, 24, 20) is source (16, 8, 48, 40)."""
        assert keyslice.source_box((8, 4, 24, 20), 0.5, 96, 128) == (16.0, 8.0, 48.0, 40.0)

    def test_box_into_the_padding_is_clipped(self):
        """The letterbox pads 96 rows to 64 / 0.5 = 128: a box reaching y = 60 (row 120) stops at row 96."""
        assert keyslice.source_box((40, 40, 70, 60), 0.5, 96, 128) == (80.0, 80.0, 128.0, 96.0)

    def test_bad_scale(self):
        with pytest.raises(ValueError, match="scale must be > 0"):
            keyslice.source_box((0, 0, 1, 1), 0.0, 8, 8)


class TestKeySlices:
    def test_slice_index_is_position_order_not_file_order(self, tmp_path):
        """Served slice k is the k-th along the slice normal; normal (-1, 0, 0) orders x = 20, 16, ..., 0 mm."""
        datasets = shuffled_series(tmp_path, 96, 128, 6)
        assert [float(ds.ImagePositionPatient[0]) for ds in datasets] != sorted(float(ds.ImagePositionPatient[0]) for ds in datasets)
        dx = hand_diagnosis(datasets, [0.5] * 6, [(0, 0, 1, 1)] * 6)
        sources = keyslice.read_sources(datasets, dx)
        assert [float(s.dataset.ImagePositionPatient[0]) for s in sources.slices] == [20.0, 16.0, 12.0, 8.0, 4.0, 0.0]
        assert all(s.frame is None and (s.rows, s.cols) == (96, 128) for s in sources.slices)

    def test_key_slice_and_its_box(self, tmp_path):
        """The highest-scoring slice (served index 4: x = 4 mm, InstanceNumber 2) with its box in source pixels."""
        datasets = shuffled_series(tmp_path, 96, 128, 6)
        scores = [0.3, 0.5, 0.0, 0.2, 0.9, 0.7]
        boxes = [(0, 0, 1, 1)] * 4 + [(8, 4, 24, 20)] + [(0, 0, 1, 1)]
        dx = hand_diagnosis(datasets, scores, boxes)
        (key,) = keyslice.key_slices(keyslice.read_sources(datasets, dx), dx, 64)
        by_instance = {int(ds.InstanceNumber): ds.SOPInstanceUID for ds in datasets}
        assert key.slice_index == 4 and key.source.dataset.SOPInstanceUID == by_instance[2]
        assert key.box == (16.0, 8.0, 48.0, 40.0) and key.score == pytest.approx(0.9) and key.d == pytest.approx(0.8)

    def test_tie_takes_the_first_slice(self, tmp_path):
        """Equal best scores: the first slice along the normal (x = 20 mm, InstanceNumber 6)."""
        datasets = shuffled_series(tmp_path, 96, 128, 6)
        dx = hand_diagnosis(datasets, [0.9] * 6, [(8, 4, 24, 20)] * 6)
        (key,) = keyslice.key_slices(keyslice.read_sources(datasets, dx), dx, 64)
        assert key.slice_index == 0 and int(key.source.dataset.InstanceNumber) == 6

    def test_series_without_box_has_no_key_slice(self, tmp_path):
        """No slice with a box (D NaN everywhere): no key slice, no best box."""
        datasets = shuffled_series(tmp_path, 96, 128, 6)
        dx = hand_diagnosis(datasets, [0.0] * 6, [(0, 0, 0, 0)] * 6)
        keys = keyslice.key_slices(keyslice.read_sources(datasets, dx), dx, 64)
        assert keys == [] and keyslice.best_key_slice(keys) is None

    def test_multiframe_frames_in_position_order(self):
        """Enhanced MR frames at x = 4, -8, 0 mm lie at positions -4, 8, 0: served slices are frames 1, 3, 2."""
        ds = pydicom.dcmread(io.BytesIO(enhanced_mr_bytes([4.0, -8.0, 0.0], [10, 20, 30])))
        dx = hand_diagnosis([ds], [0.1, 0.2, 0.9], [(0, 0, 1, 1)] * 3)
        sources = keyslice.read_sources([ds], dx)
        assert [s.frame for s in sources.slices] == [1, 3, 2]
        (key,) = keyslice.key_slices(sources, dx, 12)  # 4 x 6 frames letterboxed to 12: scale 2
        assert key.source.frame == 2

    def test_datasets_without_file_meta(self, tmp_path):
        """Datasets as decoded from the network (no file meta) map to the same slices as the files."""
        datasets = shuffled_series(tmp_path, 96, 128, 6)
        dx = hand_diagnosis(datasets, [0.5] * 6, [(0, 0, 1, 1)] * 6)
        for ds in datasets:
            del ds.file_meta
        sources = keyslice.read_sources(datasets, dx)
        assert [float(s.dataset.ImagePositionPatient[0]) for s in sources.slices] == [20.0, 16.0, 12.0, 8.0, 4.0, 0.0]

    def test_other_instances_are_refused(self, tmp_path):
        """A diagnosis of other instances (one slice more) is refused, not mapped to the wrong images."""
        datasets = shuffled_series(tmp_path, 96, 128, 6)
        dx = hand_diagnosis(datasets, [0.5] * 6, [(0, 0, 1, 1)] * 6)
        with pytest.raises(ValueError, match="same instances that were diagnosed"):
            keyslice.read_sources(datasets[:5], dx)


# --------------------------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def pipeline(tiny_artifacts) -> Pipeline:
    return Pipeline.from_artifacts(tiny_artifacts)


@pytest.fixture(scope="module")
def made(dicom_patient, pipeline, tmp_path_factory):
    """The dicom_patient diagnosed in process, its datasets, and the SR and GSPS written to disk."""
    files = read_patient_files(dicom_patient)
    dx = pipeline.diagnose_files(files)
    datasets = read_folder(dicom_patient)
    sr, pr = results.make_results(datasets, dx, settings=SETTINGS)
    out = tmp_path_factory.mktemp("results")
    sr.save_as(out / "SR.dcm", enforce_file_format=True)
    pr.save_as(out / "PR.dcm", enforce_file_format=True)
    return {"dx": dx, "datasets": datasets, "sr": out / "SR.dcm", "pr": out / "PR.dcm", "patient": dicom_patient}


def groups(report: hd.sr.Comprehensive3DSR) -> dict[str, object]:
    """Measurement groups by tracking identifier."""
    found = [*report.content.get_planar_roi_measurement_groups(), *report.content.get_image_measurement_groups()]
    return {g.tracking_identifier: g for g in found}


def evaluations(group) -> dict[str, str]:
    return {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}


def measurements(group) -> dict[str, float]:
    return {m.name.meaning: m.value for m in group.get_measurements()}


class TestReport:
    def test_diagnosis_and_probability(self, made):
        """The patient group carries the label as SNOMED CT Malignant/Benign and P(malignant) as a number."""
        dx = made["dx"]
        patient = groups(hd.sr.srread(made["sr"]))["Patient-level diagnosis"]
        assert evaluations(patient) == {"Classification (attribute)": dx.label.capitalize()}
        values = measurements(patient)
        assert values["Probability of cancer"] == pytest.approx(dx.p_malignant, abs=1e-6)
        assert values["Age module P(malignant given age) (A)"] == pytest.approx(dx.age_a, abs=1e-6)
        assert values["Subject Age"] == pytest.approx(60.0)
        assert patient.finding_type.value == codes.SCT.Neoplasm.value

    def test_components_and_votes(self, made):
        """One group per served series with its vote, M, and the D and score of its best box."""
        dx = made["dx"]
        found = groups(hd.sr.srread(made["sr"]))
        names = {1: "Malignant", 0: "Benign", -1: "Indeterminate result"}
        for q, info in enumerate(dx.series_info):
            group = found[f"Series {info['series_number']} {info['sequence']}"]
            assert evaluations(group) == {"Series vote": names[int(dx.series_votes[q])]}
            values = measurements(group)
            members = np.flatnonzero(dx.slice_series == q)
            assert values["Sequence classifier P(malignant) (M)"] == pytest.approx(float(dx.series_m[q]), abs=1e-6)
            assert values["Detector P(malignant) of the box (D)"] == pytest.approx(float(dx.slice_d[members[0]]), abs=1e-6)
            assert values["Detection score of the box"] == pytest.approx(0.9, abs=1e-6)

    def test_best_box_region_on_the_key_slice(self, made):
        """The best box (score 0.9 everywhere: the first slice along the normal of series 1, SAG T1/IM0005.dcm, x = 16 mm)
        is a closed 5-point polyline in that slice's pixels: detector (16, 16, 32, 32) / (64 / 48) = (12, 12, 24, 24)."""
        box = groups(hd.sr.srread(made["sr"]))["Best detected box"]
        key_slice = pydicom.dcmread(made["patient"] / "SAG T1" / "IM0005.dcm")
        assert box.reference_type == codes.DCM.ImageRegion
        assert box.roi.GraphicType == "POLYLINE"
        np.testing.assert_allclose(box.roi.value, [[12, 12], [24, 12], [24, 24], [12, 24], [12, 12]])
        (source,) = box.roi.ContentSequence
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key_slice.SOPInstanceUID
        assert source.ReferencedSOPSequence[0].ReferencedSOPClassUID == key_slice.SOPClassUID
        assert evaluations(box) == {"Class of the detected box": "Malignant" if made["dx"].slice_d[0] >= 0.5 else "Benign"}

    def test_no_concept_name_twice_in_a_group(self, made):
        """Inside each measurement group every measurement and evaluation has its own concept name."""
        for label, group in groups(hd.sr.srread(made["sr"])).items():
            names = [m.name for m in group.get_measurements()] + [q.name for q in group.get_qualitative_evaluations()]
            assert len({(n.value, n.scheme_designator) for n in names}) == len(names), label

    def test_algorithm_and_equipment(self, made):
        """Algorithm name, version and model digest in each group; the algorithm as Contributing Equipment."""
        ds = pydicom.dcmread(made["sr"])
        for group in groups(hd.sr.srread(made["sr"])).values():
            texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue") for item in group[0].ContentSequence
                     if item.ValueType == "TEXT"}
            assert texts["Algorithm Name"] == ENSEMBLE_NAME and texts["Algorithm Version"] == "9.9.9"
            assert texts["Algorithm Parameters"] == f"model_digest={DIGEST}"
        (algorithm,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "spine-wff"]
        assert algorithm.ManufacturerModelName == ENSEMBLE_NAME and algorithm.SoftwareVersions == "9.9.9"
        assert algorithm.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.ProcessingEquipment.value
        assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == [results.WFF_SCHEME]

    def test_new_series_of_the_same_study(self, made):
        """SR and GSPS: the input's study and patient, each in a series of its own, under the UID root."""
        source = made["datasets"][0]
        input_series = {ds.SeriesInstanceUID for ds in made["datasets"]}
        sr, pr = pydicom.dcmread(made["sr"]), pydicom.dcmread(made["pr"])
        for ds, modality in ((sr, "SR"), (pr, "PR")):
            assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.Modality == modality
            assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
            assert ds.SeriesInstanceUID not in input_series and uids.is_own_uid(ds.SOPInstanceUID, uids.DEFAULT_UID_ROOT)
            assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert sr.SeriesInstanceUID != pr.SeriesInstanceUID
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR

    @pytest.mark.parametrize("kind", ["comprehensive3d", "comprehensive"])
    def test_dciodvfy_finds_no_error(self, made, kind, tmp_path):
        """dciodvfy checks both objects against their IODs (it names them) and reports no Error line."""
        dx, datasets = made["dx"], made["datasets"]
        sr, pr = results.make_results(datasets, dx, settings=results.ResultSettings(**{**vars(SETTINGS), "sr_kind": kind}))
        for ds, iod in ((sr, "Comprehensive3DSR" if kind == "comprehensive3d" else "ComprehensiveSR"), (pr, "GrayscaleSoftcopyPresentationState")):
            path = tmp_path / f"{iod}.dcm"
            ds.save_as(path, enforce_file_format=True)
            lines = dciodvfy(path)
            assert iod in lines, lines
            assert not [line for line in lines if line.startswith("Error")], lines

    def test_dciodvfy_sees_a_broken_object(self, made, tmp_path):
        """The dciodvfy check can fail: the SR without its Type 1 Completion Flag is an Error."""
        ds = pydicom.dcmread(made["sr"])
        del ds.CompletionFlag
        ds.save_as(tmp_path / "broken.dcm")
        assert any(line.startswith("Error") and "CompletionFlag" in line for line in dciodvfy(tmp_path / "broken.dcm"))

    def test_byte_identical_on_resend(self, made):
        """The same instances (in any order) and model give byte-identical SR and GSPS."""
        dx, datasets = made["dx"], made["datasets"]
        again = results.make_results(list(reversed(datasets)), dx, settings=SETTINGS)
        assert [dcm_bytes(ds) for ds in again] == [made["sr"].read_bytes(), made["pr"].read_bytes()]

    def test_one_more_instance_new_uids(self, made, pipeline, tmp_path):
        """A late instance (here an axial localizer the reader skips) makes a new result: new series and instance UIDs."""
        folder = tmp_path / "P"
        shutil.copytree(made["patient"], folder)
        first = made["datasets"][0]
        extra = pydicom.dcmread(made["patient"] / "SAG T1" / "IM0001.dcm")
        extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        extra.SeriesInstanceUID, extra.SeriesDescription, extra.ImageOrientationPatient = generate_uid(), "LOC", [1, 0, 0, 0, 1, 0]
        extra.save_as(folder / "loc.dcm")
        dx = pipeline.diagnose_files(read_patient_files(folder))
        sr, pr = results.make_results(read_folder(folder), dx, settings=SETTINGS)
        old_sr, old_pr = pydicom.dcmread(made["sr"]), pydicom.dcmread(made["pr"])
        assert sr.StudyInstanceUID == first.StudyInstanceUID
        assert sr.SeriesInstanceUID != old_sr.SeriesInstanceUID and sr.SOPInstanceUID != old_sr.SOPInstanceUID
        assert pr.SeriesInstanceUID != old_pr.SeriesInstanceUID and pr.SOPInstanceUID != old_pr.SOPInstanceUID

    def test_content_date_is_the_newest_instance(self, made):
        """Content date/time: the newest of the instances' dates; 1970-01-01 when none has one (dicom_patient has none)."""
        assert (pydicom.dcmread(made["sr"]).ContentDate, pydicom.dcmread(made["sr"]).ContentTime) == ("19700101", "000000")
        datasets = [pydicom.dcmread(io.BytesIO(dcm_bytes(ds))) for ds in made["datasets"]]
        datasets[3].StudyDate, datasets[3].StudyTime = "20240102", "101500"
        datasets[7].AcquisitionDate, datasets[7].AcquisitionTime = "20240102", "103000.25"
        sr, pr = results.make_results(datasets, made["dx"], settings=SETTINGS)
        assert tuple(map(str, (sr.ContentDate, sr.ContentTime, sr.InstanceCreationDate))) == ("20240102", "103000", "20240102")
        assert tuple(map(str, (pr.PresentationCreationDate, pr.PresentationCreationTime))) == ("20240102", "103000")

    def test_patient_name_outside_ascii(self, made):
        """A Latin-1 patient name (ISO_IR 100 input) survives in the UTF-8 objects."""
        datasets = [pydicom.dcmread(io.BytesIO(dcm_bytes(ds))) for ds in made["datasets"]]
        for ds in datasets:
            ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jürgen"
        reread = [pydicom.dcmread(io.BytesIO(dcm_bytes(ds))) for ds in datasets]
        for obj in results.make_results(reread, made["dx"], settings=SETTINGS):
            back = pydicom.dcmread(io.BytesIO(dcm_bytes(obj)))
            assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "Müller^Jürgen"


class TestPresentationState:
    def test_boxes_and_labels_on_the_key_slices(self, made):
        """One annotation per series with a box, on its key slice (IM0005: first along the normal), the box
        as drawn in the SR and its class and probability as text."""
        dx = made["dx"]
        pr = pydicom.dcmread(made["pr"])
        assert len(pr.GraphicAnnotationSequence) == len(dx.series_info) == 3
        for annotation, folder in zip(pr.GraphicAnnotationSequence, ("SAG T1", "SAG T2", "SAG STIR")):
            key = pydicom.dcmread(made["patient"] / folder / "IM0005.dcm")
            assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
            (graphic,) = annotation.GraphicObjectSequence
            assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
            np.testing.assert_allclose(np.reshape(graphic.GraphicData, (-1, 2)), [[12, 12], [24, 12], [24, 24], [12, 24], [12, 12]])
            d = float(dx.slice_d[np.flatnonzero(dx.slice_series == ["SAG T1", "SAG T2", "SAG STIR"].index(folder))[0]])
            name, p = results.box_class(d)
            texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
            assert f"{name} {p:.2f}" in texts
            assert any(t.startswith(f"spine-wff: {dx.label} P={dx.p_malignant:.2f}") for t in texts)
            assert annotation.GraphicLayer == name.upper()
        referenced = {ref.ReferencedSOPInstanceUID for s in pr.ReferencedSeriesSequence for ref in s.ReferencedImageSequence}
        assert len(referenced) == 3

    def test_no_box_anywhere(self, tmp_path):
        """A diagnosis without boxes: an SR without an image region, and a GSPS with the diagnosis text only."""
        datasets = shuffled_series(tmp_path, 96, 128, 6)
        dx = hand_diagnosis(datasets, [0.0] * 6, [(0, 0, 0, 0)] * 6, votes=[-1], label="benign", p=0.5)
        sr, pr = results.make_results(datasets, dx, settings=SETTINGS)
        found = groups(hd.sr.srread(io.BytesIO(dcm_bytes(sr))))
        assert "Best detected box" not in found and evaluations(found["Series 1 T2"]) == {"Series vote": "Indeterminate result"}
        (annotation,) = pr.GraphicAnnotationSequence
        assert "GraphicObjectSequence" not in annotation
        assert annotation.TextObjectSequence[0].UnformattedTextValue.endswith("no box detected")
        middle = {int(ds.InstanceNumber): ds.SOPInstanceUID for ds in datasets}[3]  # served slice 3 of 6: x = 8 mm
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == middle
        lines = []
        for ds, name in ((sr, "sr.dcm"), (pr, "pr.dcm")):
            ds.save_as(tmp_path / name, enforce_file_format=True)
            lines += dciodvfy(tmp_path / name)
        assert not [line for line in lines if line.startswith("Error")], lines


class TestSettings:
    def test_model_identity_required(self, made):
        """Without the served model's identity no results are made (their UIDs depend on it)."""
        with pytest.raises(ValueError, match="model_identity"):
            results.make_results(made["datasets"], made["dx"], settings=results.ResultSettings())

    def test_with_model(self):
        identity = type("Identity", (), {"name": "m", "version": "1.0", "digest": DIGEST, "image_size": 64})()
        s = results.ResultSettings().with_model(identity)
        assert (s.model_name, s.model_version, s.model_digest, s.detector_size) == ("m", "1.0", DIGEST, 64)

    @pytest.mark.parametrize("field, value, match", [("sr_kind", "enhanced", "sr_kind"), ("uid_root", "1.02", "leading zeros"),
                                                     ("manufacturer", "", "manufacturer")])
    def test_bad_settings(self, field, value, match):
        with pytest.raises(ValueError, match=match):
            results.ResultSettings(**{field: value})


# ----------------------------------------------------------------------------------------- model digest


class TestModelDigest:
    def test_different_artifacts_different_digests(self, tiny_artifacts, tmp_path):
        """Another classifier gives another digest; the same artifacts, or another serving section, the same."""
        other = tmp_path / "other"
        shutil.copytree(tiny_artifacts, other)
        make_classifier_onnx(TINY, other / "classifier.onnx", shift=0.1)

        def digest(artifacts, name, **kwargs):
            repo = build_repository(tmp_path / name, "embedded", artifacts, **kwargs)
            return read_config(repo / ENSEMBLE_NAME / "config.pbtxt").parameters[MODEL_DIGEST_KEY].string_value

        first = digest(tiny_artifacts, "a")
        assert first.startswith("sha256:") and len(first) == 7 + 64
        assert digest(tiny_artifacts, "b") == first
        assert digest(tiny_artifacts, "c", serving=TINY.serving.__class__(instances_python=3)) == first
        assert digest(other, "d") != first

    def test_repository_config_holds_it(self, tiny_artifacts, tmp_path):
        """wff repo build writes the digest of what it copied and its own version into the ensemble's config parameters."""
        repo = build_repository(tmp_path / "repo", "embedded", tiny_artifacts)
        params = read_config(repo / ENSEMBLE_NAME / "config.pbtxt").parameters
        assert params[MODEL_DIGEST_KEY].string_value == model_digest(repo, TINY)
        assert params[WFF_VERSION_KEY].string_value == results.wff_version()
        (repo / "fusion" / "1" / "age_prior.json").write_text("{}")
        assert model_digest(repo, TINY) != params[MODEL_DIGEST_KEY].string_value

    def test_identity_needs_the_digest(self):
        """A repository built without the digest is named, with what to do."""
        detector = {"input": [{"dims": ["1", "64", "64"]}]}
        with pytest.raises(DiagnosisError, match="no model_digest parameter; rebuild"):
            identity_from_configs({"name": ENSEMBLE_NAME, "parameters": {}}, detector)
        ok = identity_from_configs({"name": ENSEMBLE_NAME, "parameters": {"model_digest": {"string_value": DIGEST}}}, detector)
        assert (ok.digest, ok.version, ok.image_size) == (DIGEST, "unknown", 64)


class TestDiagnoseSrOffline:
    def test_missing_highdicom_names_the_extra(self, dicom_patient, tmp_path, monkeypatch):
        """--sr without highdicom: exit 1 naming the extra to install, before anything is sent."""
        monkeypatch.setitem(sys.modules, "highdicom", None)
        monkeypatch.delitem(sys.modules, "wff.pacs.results", raising=False)
        result = CliRunner().invoke(main, ["diagnose", str(dicom_patient), "--url", "127.0.0.1:1", "--sr", str(tmp_path)])
        assert result.exit_code == 1, result.output
        assert "needs highdicom" in result.stderr and "pip install 'spine-wff[pacs]'" in result.stderr

    def test_bad_uid_root_is_a_usage_error(self, dicom_patient, tmp_path):
        result = CliRunner().invoke(main, ["diagnose", str(dicom_patient), "--sr", str(tmp_path), "--uid-root", "1.02"])
        assert result.exit_code == 2 and "--uid-root" in result.output


# -------------------------------------------------------------------------------------- served (tritonserver)


served = embedded_server("pacs-results")


@pytest.mark.server
class TestServed:
    def test_model_identity(self, served):
        """The client reads the digest the repository build wrote, and the detector's input size."""
        with DiagnosisClient(served.grpc_url, timeout_s=30) as client:
            identity = client.model_identity()
        config = read_config(Path(served.repository) / ENSEMBLE_NAME / "config.pbtxt")
        assert identity.name == ENSEMBLE_NAME and identity.digest == config.parameters[MODEL_DIGEST_KEY].string_value
        assert identity.image_size == TINY.image.size and identity.version == results.wff_version()

    def test_diagnose_sr_matches_json(self, served, tmp_path):
        """wff diagnose --sr writes SR.dcm and PR.dcm whose diagnosis and P(malignant) are the --json output's;
        a second run writes the same objects."""
        patient = write_dicom_patient(tmp_path / "P", {"SAG T1": 4, "SAG T2": 4}, seed=3)
        outputs = []
        for run in ("a", "b"):
            args = ["diagnose", str(patient), "--url", served.grpc_url, "--timeout", "30", "--json", str(tmp_path / f"{run}.json"),
                    "--sr", str(tmp_path / run)]
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            outputs.append(tmp_path / run)
        answer = json.loads((tmp_path / "a.json").read_text())
        patient_group = groups(hd.sr.srread(outputs[0] / "SR.dcm"))["Patient-level diagnosis"]
        assert measurements(patient_group)["Probability of cancer"] == pytest.approx(answer["p_malignant"], abs=1e-6)
        assert evaluations(patient_group) == {"Classification (attribute)": answer["diagnosis"].capitalize()}
        for name in ("SR.dcm", "PR.dcm"):
            assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes()
            assert not [line for line in dciodvfy(outputs[0] / name) if line.startswith("Error")]
