"""Bad input through the real ensemble over gRPC: INVALID_ARGUMENT naming the problem and the file.

Every case of issue #7 is sent to the shared ``limited_server`` (conftest: request limits of
LIMITED_SERVING) with tritonclient directly, so the gRPC status itself is checked; a good
patient is diagnosed right after each rejection, and once more with every bad request in
flight at the same time as good ones.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from conftest import LIMITED_SERVING
from tritonclient.utils import InferenceServerException

from wff.client.grpc_client import AGE_INPUT, FILES_INPUT, DiagnosisClient, RejectedInput, build_inputs, read_patient_files
from wff.loadtest.soak import drop_pixels, other_patient, rewrite_dicom
from wff.contracts import ENSEMBLE_NAME

AXIAL = [1, 0, 0, 0, 1, 0]
TIMEOUT_S = 60



def axial(ds) -> None:
    ds.ImageOrientationPatient = AXIAL


def big_slices(ds) -> None:
    side = int(LIMITED_SERVING["max_pixels_per_slice"] ** 0.5) + 4
    ds.Rows = ds.Columns = side
    ds.PixelData = np.full((side, side), 100, np.uint16).tobytes()


def bad_requests(files: list[tuple[str, bytes]]) -> dict[str, tuple[list, float | None, str]]:
    """case -> (files, age, regex the server's message must match). Files keep their client names."""
    k = 3  # the file that is damaged: its position must be named
    name, data = files[k]

    def replaced(new: bytes) -> list:
        return files[:k] + [(name, new)] + files[k + 1:]

    first_series = [f for f in files if f[0].startswith("SAG T1/")]
    extra = [(f"extra/{i}.dcm", rewrite_dicom(files[i % len(files)][1], lambda ds, i=i: setattr(ds, "SOPInstanceUID", f"1.2.3.{i}")))
             for i in range(LIMITED_SERVING["max_files"] + 1 - len(files))]
    many_slices = [(f"S/{i}.dcm", rewrite_dicom(first_series[0][1], lambda ds, i=i: (setattr(ds, "SOPInstanceUID", f"1.2.4.{i}"),
                                                                               setattr(ds, "ImagePositionPatient", [4.0 * i, -100.0, 100.0]))))
                   for i in range(LIMITED_SERVING["max_slices"] + 1)]
    return {
        "non-DICOM bytes": (replaced(b"%PDF-1.4 this is a report, not an image" * 8), None,
                            rf"{FILES_INPUT}\[{k}\]: not a DICOM file"),
        "truncated file": (replaced(data[: len(data) // 2]), None,
                           rf"{FILES_INPUT}\[{k}\]: .*the file holds \d+ \(truncated inside \(7FE0,0010\) PixelData"),
        "no pixel data": (replaced(rewrite_dicom(data, drop_pixels)), None, rf"{FILES_INPUT}\[{k}\]: DICOM without pixel data"),
        "two patients": (replaced(rewrite_dicom(data, other_patient)), None,
                         rf"{FILES_INPUT}\[{k}\]: different PatientID from {FILES_INPUT}\[0\]; .*more than one patient"),
        "no sagittal series": ([(n, rewrite_dicom(d, axial)) for n, d in files], None,
                               rf"no usable sagittal T1/T2/STIR series \(series 1 'SAG T1' \(5 files from {FILES_INPUT}\[5\]\): not sagittal \(axial"),
        "age too high": (files, 200.0, r"AGE_YEARS: .*200"),
        "age negative": (files, -1.0, r"AGE_YEARS: .*-1"),
        "age NaN": (files, float("nan"), r"AGE_YEARS: .*nan"),
        "too many files": (files + extra, None, rf"{LIMITED_SERVING['max_files'] + 1} files exceed the limit of {LIMITED_SERVING['max_files']} .*serving.max_files"),
        "too many bytes": (files[:1] + [("huge.dcm", b"\0" * LIMITED_SERVING["max_bytes"])], None,
                           rf"bytes exceed the limit of {LIMITED_SERVING['max_bytes']} .*serving.max_bytes"),
        "too many slices": (many_slices, None, rf"no usable .*: {LIMITED_SERVING['max_slices'] + 1} slices .*, more than the "
                                               rf"{LIMITED_SERVING['max_slices']} a patient may have \(serving.max_slices\)"),
        "too many pixels": (replaced(rewrite_dicom(data, big_slices)), None,
                            rf"{FILES_INPUT}\[{k}\]: \d+x\d+ pixels exceed the limit of {LIMITED_SERVING['max_pixels_per_slice']} .*serving.max_pixels_per_slice"),
    }


@pytest.fixture(scope="module")
def good_files(dicom_patient) -> list[tuple[str, bytes]]:
    return read_patient_files(dicom_patient)


@pytest.fixture(scope="module")
def cases(good_files):
    return bad_requests(good_files)


def infer(url: str, files, age):
    with grpcclient.InferenceServerClient(url) as c:
        return c.infer(ENSEMBLE_NAME, build_inputs(files, age), client_timeout=TIMEOUT_S)


def assert_good(url: str, files) -> None:
    result = infer(url, files, None)
    assert result.as_numpy("DIAGNOSIS")[0] in (b"benign", b"malignant")


@pytest.mark.server
class TestEachBadInput:
    @pytest.mark.parametrize("case", [
        "non-DICOM bytes", "truncated file", "no pixel data", "two patients", "no sagittal series",
        "age too high", "age negative", "age NaN", "too many files", "too many bytes", "too many slices", "too many pixels",
    ])
    def test_rejected_and_server_keeps_serving(self, limited_server, good_files, cases, case):
        """INVALID_ARGUMENT whose message names the problem (and the file, by position); the next patient is diagnosed."""
        files, age, match = cases[case]
        with pytest.raises(InferenceServerException) as e:
            infer(limited_server.grpc_url, files, age)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value.message()
        assert re.search(match, e.value.message()), e.value.message()
        assert_good(limited_server.grpc_url, good_files)

    def test_empty_request(self, limited_server, good_files):
        """No files at all (DICOM_FILES and AGE_YEARS of shape [0]) is rejected by the preprocess step."""
        empty = [grpcclient.InferInput(FILES_INPUT, [0], "BYTES"), grpcclient.InferInput(AGE_INPUT, [0], "FP32")]
        empty[0].set_data_from_numpy(np.zeros((0,), np.object_))
        empty[1].set_data_from_numpy(np.zeros((0,), np.float32))
        with grpcclient.InferenceServerClient(limited_server.grpc_url) as c, pytest.raises(InferenceServerException) as e:
            c.infer(ENSEMBLE_NAME, empty, client_timeout=TIMEOUT_S)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert f"{FILES_INPUT} must be a non-empty 1-D list of files, got shape (0,)" in e.value.message()
        assert_good(limited_server.grpc_url, good_files)

    def test_request_without_files_input(self, limited_server, good_files):
        """A request carrying only AGE_YEARS is rejected by Triton itself, naming the missing input."""
        age = grpcclient.InferInput(AGE_INPUT, [1], "FP32")
        age.set_data_from_numpy(np.array([50.0], np.float32))
        with grpcclient.InferenceServerClient(limited_server.grpc_url) as c, pytest.raises(InferenceServerException) as e:
            c.infer(ENSEMBLE_NAME, [age], client_timeout=TIMEOUT_S)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and FILES_INPUT in e.value.message()
        assert_good(limited_server.grpc_url, good_files)

    def test_client_names_the_file(self, limited_server, good_files, cases):
        """Through DiagnosisClient the position is followed by the client's own file name."""
        files, age, _ = cases["no pixel data"]
        with DiagnosisClient(limited_server.grpc_url, timeout_s=TIMEOUT_S) as client:
            with pytest.raises(RejectedInput, match=rf"{FILES_INPUT}\[3\] \({files[3][0]}\): DICOM without pixel data") as e:
                client.diagnose(files, age)
        assert e.value.status == "INVALID_ARGUMENT" and files[3][0] == "SAG STIR/IM0004.dcm"


@pytest.mark.server
def test_bad_and_good_requests_in_flight_together(limited_server, good_files, cases):
    """Every bad request and as many good ones at once: each bad one INVALID_ARGUMENT, every good one diagnosed."""

    async def run():
        async with grpcclient_aio.InferenceServerClient(limited_server.grpc_url) as c:
            async def one(files, age):
                try:
                    result = await c.infer(ENSEMBLE_NAME, build_inputs(files, age, grpcclient_aio), client_timeout=TIMEOUT_S)
                    return result.as_numpy("DIAGNOSIS")[0]
                except InferenceServerException as e:
                    return e.status()
            bad = [one(files, age) for files, age, _ in cases.values()]
            good = [one(good_files, None) for _ in cases]
            return await asyncio.gather(*[x for pair in zip(bad, good) for x in pair])

    outcomes = asyncio.run(run())
    assert outcomes[0::2] == ["StatusCode.INVALID_ARGUMENT"] * len(cases)
    assert all(o in (b"benign", b"malignant") for o in outcomes[1::2]), outcomes[1::2]
    assert limited_server.is_ready() and limited_server.is_running()


@pytest.mark.server
class TestAgeSources:
    @pytest.mark.parametrize("patient_age, request_age, used, source", [
        ("006M", None, 0.5, "PatientAge"),
        ("104W", None, 104 * 7 / 365.25, "PatientAge"),
        ("045Y", 61.0, 61.0, "request"),
        (None, None, None, "none: diagnosed without the age term"),
    ])
    def test_age_used_and_said(self, limited_server, good_files, patient_age, request_age, used, source):
        """The request's age beats PatientAge (any DICOM unit); with neither, no age term, and the notes say which."""
        def set_age(ds):
            if patient_age is None:
                del ds.PatientAge
            else:
                ds.PatientAge = patient_age

        files = [(name, rewrite_dicom(data, set_age)) for name, data in good_files]
        with DiagnosisClient(limited_server.grpc_url, timeout_s=TIMEOUT_S) as client:
            dx = client.diagnose(files, request_age)
        assert dx.notes["age_source"] == source
        if used is None:
            assert np.isnan(dx.age_used) and np.isnan(dx.age_a)
        else:
            assert dx.age_used == pytest.approx(used, abs=1e-4) and not np.isnan(dx.age_a)
