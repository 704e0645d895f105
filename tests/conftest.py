"""Shared fixtures: a tiny profile and stand-in artifacts (random-free ONNX graphs with the contract's names).

The stand-in models are built with onnx.helper (no torch), so they load in milliseconds:

* detector: every slice gets the same two boxes (scores 0.9 and 0.6, count 2), both with
  malignancy = the slice's mean intensity;
* classifier: P(malignant) = the clip's mean intensity.

They make the served numbers predictable; a tiny trained model can replace them later.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from wff.config import Profile
from wff.contracts import contracts_for
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import FusionSettings

TINY = Profile(name="tiny").replace(
    image={"size": 64},
    detector={"top_k": 3},
    classifier={"clip_len": 4, "crop_size": 16},
)
ONNX_OPSET = 17
ONNX_IR_VERSION = 8



def wait_for(condition, timeout_s: float, interval_s: float = 0.05):
    """Poll ``condition()`` until it returns something true or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    return condition()

def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value, name + "_value"))


def _tensor(spec, batch: str = "batch") -> onnx.ValueInfoProto:
    elem = {"TYPE_FP32": TensorProto.FLOAT, "TYPE_INT32": TensorProto.INT32}[spec.data_type]
    return helper.make_tensor_value_info(spec.name, elem, [batch, *spec.dims])


def _save(nodes, contract, path: Path) -> Path:
    graph = helper.make_graph(nodes, contract.name, [_tensor(s) for s in contract.inputs], [_tensor(s) for s in contract.outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_detector_onnx(profile: Profile, path: Path) -> Path:
    """Stand-in detector over ``contracts_for(profile).detector``."""
    c = contracts_for(profile).detector
    k, s = profile.detector.top_k, profile.image.size
    box = np.zeros((1, k, 4), np.float32)
    box[0, 0] = (s / 4, s / 4, s / 2, s / 2)
    box[0, 1] = (s / 8, s / 8, s / 2, 3 * s / 4)
    score = np.zeros((1, k), np.float32)
    score[0, :2] = (0.9, 0.6)
    label = np.zeros((1, k), np.int32)
    label[0, :2] = (2, 1)
    nodes = [
        helper.make_node("Shape", ["detector_image"], ["in_shape"]),
        _const("zero", np.array([0], np.int64)),
        _const("one", np.array([1], np.int64)),
        helper.make_node("Slice", ["in_shape", "zero", "one"], ["batch_dim"]),
        _const("k4", np.array([k, 4], np.int64)),
        _const("k1", np.array([k], np.int64)),
        _const("c1", np.array([1], np.int64)),
        helper.make_node("Concat", ["batch_dim", "k4"], ["shape_bk4"], axis=0),
        helper.make_node("Concat", ["batch_dim", "k1"], ["shape_bk"], axis=0),
        helper.make_node("Concat", ["batch_dim", "c1"], ["shape_b1"], axis=0),
        _const("box", box),
        _const("score", score),
        _const("label", label),
        _const("count", np.array([[2]], np.int32)),
        helper.make_node("Expand", ["box", "shape_bk4"], ["detector_boxes"]),
        helper.make_node("Expand", ["score", "shape_bk"], ["detector_scores"]),
        helper.make_node("Expand", ["label", "shape_bk"], ["detector_labels"]),
        helper.make_node("Expand", ["count", "shape_b1"], ["detector_count"]),
        helper.make_node("ReduceMean", ["detector_image"], ["mean"], axes=[1, 2, 3], keepdims=0),  # (B,)
        helper.make_node("Unsqueeze", ["mean", "one"], ["mean_b1"]),  # (B, 1)
        helper.make_node("Expand", ["mean_b1", "shape_bk"], ["detector_malignancy"]),  # (B, K)
    ]
    return _save(nodes, c, path)


def make_classifier_onnx(profile: Profile, path: Path, shift: float = 0.0) -> Path:
    """Stand-in sequence classifier over ``contracts_for(profile).classifier``: P(malignant) = mean
    intensity of the clip + ``shift``."""
    c = contracts_for(profile).classifier
    nodes = [
        helper.make_node("ReduceMean", ["classifier_clip"], ["mean"], axes=[1, 2, 3, 4], keepdims=0),  # (B,)
        _const("shift", np.array(shift, np.float32)),
        helper.make_node("Add", ["mean", "shift"], ["p"]),
        _const("one", np.array([1], np.int64)),
        _const("unit", np.array(1.0, np.float32)),
        helper.make_node("Unsqueeze", ["p", "one"], ["p_b1"]),  # (B, 1)
        helper.make_node("Sub", ["unit", "p_b1"], ["q_b1"]),
        helper.make_node("Concat", ["q_b1", "p_b1"], ["classifier_probs"], axis=1),  # (B, 2)
    ]
    return _save(nodes, c, path)


def write_artifacts(profile: Profile, out: Path) -> Path:
    """profile.json, detector.onnx, classifier.onnx, age_prior.json, fusion.json, as ``wff train`` writes them."""
    out.mkdir(parents=True, exist_ok=True)
    profile.save(out / "profile.json")
    make_detector_onnx(profile, out / "detector.onnx")
    make_classifier_onnx(profile, out / "classifier.onnx")
    AgePrior.fit(np.array([15.0, 35.0, 55.0, 75.0]), np.array([0, 0, 1, 1]), profile.age).save(out / "age_prior.json")
    FusionSettings(det_threshold=profile.fusion.det_threshold).save(out / "fusion.json")
    return out


def dicom_slice(pixels: np.ndarray, series_number: int, description: str, index: int, age_years: int | None, uids: dict) -> bytes:
    """One sagittal MR slice as DICOM Part 10 bytes (uint16 pixels, 1 mm spacing, x = slice position)."""
    import io

    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids[series_number]
    ds.Modality, ds.PatientID, ds.PatientName = "MR", "TEST", "Test^Patient"
    if age_years is not None:
        ds.PatientAge = f"{age_years:03d}Y"
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, description, index + 1
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: rows along +y, columns along -z
    ds.ImagePositionPatient = [float(index * 4), -100.0, 100.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 4.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_dicom_patient(folder: Path, series: dict[str, int], size: int = 48, age_years: int | None = 60, seed: int = 0) -> Path:
    """A patient folder: one sub-folder per series description with ``n`` slices each, plus a stray .json."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    uids = {"study": generate_uid(), **{i + 1: generate_uid() for i in range(len(series))}}
    for number, (description, n) in enumerate(series.items(), start=1):
        (folder / description).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            pixels = rng.integers(0, 1000, (size, size))
            pixels[size // 4 : size // 2, size // 4 : size // 2] += 2000  # a bright "lesion"
            (folder / description / f"IM{k + 1:04d}.dcm").write_bytes(dicom_slice(pixels, number, description, k, age_years, uids))
    (folder / "annotation.json").write_text("{}")
    return folder


@pytest.fixture(scope="session")
def dicom_patient(tmp_path_factory) -> Path:
    """A three-series sagittal MR patient (T1, T2, STIR; 5 slices of 48 x 48 each), PatientAge 60."""
    return write_dicom_patient(tmp_path_factory.mktemp("patient") / "P001", {"SAG T1": 5, "SAG T2": 5, "SAG STIR": 5})


@pytest.fixture(scope="session")
def tiny_profile() -> Profile:
    return TINY


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """A training-output directory with the stand-in models for the tiny profile."""
    return write_artifacts(TINY, tmp_path_factory.mktemp("artifacts"))


# Request limits of the shared "limited" server: small enough that a test can exceed each one
# with a few small files, large enough for the dicom_patient fixture (15 slices of 48 x 48).
LIMITED_SERVING = {"max_files": 40, "max_bytes": 2 * 1024 * 1024, "max_slices": 24, "max_pixels_per_slice": 96 * 96}


@pytest.fixture(scope="session")
def limited_artifacts(tmp_path_factory) -> Path:
    """Stand-in artifacts of the tiny profile with the small request limits of LIMITED_SERVING."""
    return write_artifacts(TINY.replace(serving=LIMITED_SERVING), tmp_path_factory.mktemp("limited-artifacts"))


def serve_embedded(artifacts: Path, tmp_path_factory, folder: str, serving=None, **options):
    """A real tritonserver on free ports serving an embedded repository built from ``artifacts`` in a new temporary
    ``folder`` (with ``serving`` settings, when given), while the generator is open: ``yield from`` it in a fixture.
    ``options`` go to TritonServer (TLS, log_verbose, ...)."""
    from wff.serving.repository import build_repository
    from wff.serving.server import TritonServer

    repo = build_repository(tmp_path_factory.mktemp(folder) / "repository", "embedded", artifacts, serving=serving)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, **options) as server:
        yield server


def embedded_server(folder: str, artifacts: str = "tiny_artifacts", scope: str = "module", **options):
    """A fixture of :func:`serve_embedded` over the artifacts fixture named ``artifacts``, e.g. in a test module
    ``server = embedded_server("served")``: one tritonserver for the module."""

    def fixture(request, tmp_path_factory):
        yield from serve_embedded(request.getfixturevalue(artifacts), tmp_path_factory, folder, **options)

    fixture.__doc__ = f"A real tritonserver with the {artifacts} models ({folder}), one per {scope}."
    return pytest.fixture(scope=scope)(fixture)


# one real tritonserver for the input-handling, decoding and log tests (its log file is read by them)
limited_server = embedded_server("limited", "limited_artifacts", "session", log_verbose=1)


@pytest.fixture(scope="module")
def trt_repo(tiny_artifacts, tmp_path_factory) -> Path:
    """A --target tensorrt repository of the tiny profile with the stand-in ONNX models (the test_trt*.py files)."""
    from wff.serving.repository import build_repository

    return build_repository(tmp_path_factory.mktemp("trt") / "repo", "tensorrt", tiny_artifacts)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make both TensorRT module names unimportable, whatever this machine has."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)
