"""Hostile input: the crafted corpus in tests/hostile/ and seeded header fuzzing, in process and served.

Each corpus case (tests/hostile/cases.json, written by tests/hostile/make_corpus.py) must be
refused with InputError / INVALID_ARGUMENT whose message matches the case's regex and names
its file, within DEADLINE_S, by the reader alone and by the real server while good patients
are diagnosed beside it. The fuzz tests mutate header values of the synthetic patient at
random (seeded, bounded in count) and require every request to end, before a deadline, in a
diagnosis or a clear input error: never another exception, never a hang.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import signal
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tritonclient.grpc.aio as grpcclient_aio
from conftest import LIMITED_SERVING, TINY
from pydicom.dataelem import DataElement
from tritonclient.utils import InferenceServerException

from wff.client.grpc_client import build_inputs, read_patient_files
from wff.config import ServingConfig
from wff.contracts import ENSEMBLE_NAME
from wff.ensemble import steps
from wff.ensemble.dicom_series import read_study
from wff.ensemble.types import InputError

CORPUS = Path(__file__).parent / "hostile"
CASES = json.loads((CORPUS / "cases.json").read_text())
LIMITS = ServingConfig(**LIMITED_SERVING)
DEADLINE_S = 3.0  # per request: the reader's checks run on headers, so a refusal takes milliseconds
SERVED_DEADLINE_S = 5.0  # per served request sent alone: the refusal plus the gRPC round trip
IN_FLIGHT_DEADLINE_S = 60.0  # every case and as many good patients at once, queued on one preprocess instance
FUZZ_SEED = 20261207
FUZZ_CASES = 1000  # in process
FUZZ_SERVED = 40  # through the real server


def corpus_files(case: str) -> list[tuple[str, bytes]]:
    folder = CORPUS / case
    return [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in sorted(folder.rglob("*.dcm"))]


class Expired(BaseException):
    """Raised by ``deadline``: a BaseException, so the reader's own ``except Exception`` cannot turn it into an answer."""


@contextmanager
def deadline(seconds: float, what: str):
    """Fail (not hang) when the block runs longer than ``seconds``, and when it ends after them."""
    def expired(*_):
        raise Expired(f"{what}: no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    took = time.monotonic() - started
    assert took < seconds, f"{what}: answered after {took:.1f} s, beyond {seconds} s"


class TestCorpusInProcess:
    @pytest.mark.parametrize("case", sorted(CASES))
    def test_refused_quickly_naming_file_and_cause(self, case):
        """read_study refuses the case within the deadline; the message has the case's cause and names its file."""
        files, spec = corpus_files(case), CASES[case]
        started = time.monotonic()
        with deadline(DEADLINE_S, case), pytest.raises(InputError) as e:
            read_study(files, LIMITS)
        assert time.monotonic() - started < DEADLINE_S
        message = str(e.value)
        assert re.search(spec["expect"], message), message
        if spec["names"] is not None:
            assert files[spec["names"]][0] in message, message

    def test_corpus_is_what_the_generator_writes(self, tmp_path):
        """The committed corpus is byte for byte what tests/hostile/make_corpus.py writes (rerun it after a change)."""
        sys.path.insert(0, str(CORPUS))
        try:
            import make_corpus
        finally:
            sys.path.remove(str(CORPUS))
        assert make_corpus.write(tmp_path) == CASES
        committed = {p.relative_to(CORPUS).as_posix(): p.read_bytes() for p in CORPUS.rglob("*.dcm")}
        written = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*.dcm")}
        assert committed.keys() == written.keys()
        assert [name for name in committed if committed[name] != written[name]] == []

    def test_deflate_bomb_is_small_and_inflates_beyond_the_default_limit(self):
        """The bomb is about 1 MB on disk and declares more than the default serving.max_bytes."""
        data = (CORPUS / "deflate_bomb" / "bomb.dcm").read_bytes()
        assert len(data) < 2 * 1024 * 1024
        at = data.index(b"\xe0\x7f\x10\x00", 0) if b"\xe0\x7f\x10\x00" in data else -1
        assert at == -1  # the pixel data element is inside the deflated stream, not readable as such
        with pytest.raises(InputError, match=r"inflates beyond the \d+ bytes left"):
            read_study([("bomb.dcm", data)], ServingConfig(max_bytes=64 * 1024 * 1024))

    def test_good_deflated_file_still_read(self, dicom_patient):
        """A deflated file within the limit is inflated and read like its uncompressed original."""
        name, data = read_patient_files(dicom_patient)[0]
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        deflated = io.BytesIO()
        ds.save_as(deflated, enforce_file_format=True)
        plain = read_study([(name, data)])
        inflated = read_study([(name, deflated.getvalue())])
        assert np.array_equal(plain.series[0].pixels, inflated.series[0].pixels)


@pytest.mark.server
@pytest.mark.parametrize("case", sorted(CASES))
def test_corpus_served_alone_in_time(limited_server, case):
    """Each case sent alone: INVALID_ARGUMENT naming the file by position and the cause, within the deadline."""
    async def run():
        async with grpcclient_aio.InferenceServerClient(limited_server.grpc_url) as c:
            await c.infer(ENSEMBLE_NAME, build_inputs(corpus_files(case), None, grpcclient_aio), client_timeout=60)

    started = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        asyncio.run(run())
    took, spec = time.monotonic() - started, CASES[case]
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value.message()
    assert re.search(spec["expect"], e.value.message()), e.value.message()
    if spec["names"] is not None:
        assert f"DICOM_FILES[{spec['names']}]" in e.value.message(), e.value.message()
    assert took < SERVED_DEADLINE_S, took


@pytest.mark.server
def test_corpus_served_beside_good_patients(limited_server, dicom_patient):
    """Every corpus case in flight at once with as many good patients: each case INVALID_ARGUMENT naming its
    file (by position) and cause; every good patient diagnosed; nothing waits beyond the deadline."""
    good = read_patient_files(dicom_patient)

    async def run():
        async with grpcclient_aio.InferenceServerClient(limited_server.grpc_url) as c:
            async def one(files):
                started = time.monotonic()
                try:
                    result = await c.infer(ENSEMBLE_NAME, build_inputs(files, None, grpcclient_aio), client_timeout=60)
                    return result.as_numpy("DIAGNOSIS")[0], "", time.monotonic() - started
                except InferenceServerException as e:
                    return e.status(), e.message(), time.monotonic() - started
            jobs = []
            for case in sorted(CASES):
                jobs += [one(corpus_files(case)), one(good)]
            return await asyncio.gather(*jobs)

    outcomes = asyncio.run(run())
    for case, (status, message, took), good_outcome in zip(sorted(CASES), outcomes[0::2], outcomes[1::2]):
        spec = CASES[case]
        assert status == "StatusCode.INVALID_ARGUMENT", (case, status, message)
        assert re.search(spec["expect"], message), (case, message)
        if spec["names"] is not None:
            assert f"DICOM_FILES[{spec['names']}]" in message, (case, message)
        assert took < IN_FLIGHT_DEADLINE_S, (case, took)
        assert good_outcome[0] in (b"benign", b"malignant"), (case, good_outcome)
    assert limited_server.is_ready() and limited_server.is_running()


# --------------------------------------------------------------------------- fuzzing

# Header tags the reader looks at, with the VR they are written with when mutated to text.
NUMERIC_US = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel", "PixelRepresentation"]
TEXT_TAGS = ["NumberOfFrames", "SeriesNumber", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
             "RescaleSlope", "RescaleIntercept", "PhotometricInterpretation", "Modality", "PatientAge", "SeriesDescription",
             "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "RepetitionTime", "EchoTime", "ImageType", "SOPInstanceUID"]
TEXT_VALUES = ["", "x", "-1", "0", "2147483647", "4294967296", "1e308", "nan", "inf", "-0", "1\\2\\3", "0\\0\\0\\0\\0\\0",
               "1\\0\\0\\0\\1\\0", "0.7\\0.7\\0\\0\\0\\-1", "MONOCHROME1", "RGB", "CT", "999Y", "T2 SAG", "A" * 300]
US_VALUES = [0, 1, 7, 8, 12, 15, 16, 17, 32, 255, 65535]


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of a Part 10 file: a header value set to a hostile one, bytes flipped, or a cut."""
    kind = rng.random()
    if kind < 0.15:  # cut anywhere
        at = rng.randrange(1, len(data))
        return data[:at], f"cut at {at}"
    if kind < 0.3:  # flip bytes in the header (before the pixel data)
        out = bytearray(data)
        end = data.rfind(b"\xe0\x7f\x10\x00")
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(132, end if end > 132 else len(data))
            out[at] = rng.randrange(256)
        return bytes(out), "bytes flipped"
    ds = pydicom.dcmread(io.BytesIO(data))
    if kind < 0.5:
        keyword, value = rng.choice(NUMERIC_US), rng.choice(US_VALUES)
        setattr(ds, keyword, value)
    else:
        keyword, value = rng.choice(TEXT_TAGS), rng.choice(TEXT_VALUES)
        tag = pydicom.datadict.tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, "UT", value)  # any text, whatever the tag's own VR allows
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), f"{keyword} = {str(value)[:24]!r}"


def fuzz_requests(files: list[tuple[str, bytes]], count: int, seed: int):
    """``count`` requests, each the patient with one to three files mutated; yields (request, description)."""
    rng = random.Random(seed)
    for n in range(count):
        request = list(files)
        what = []
        for k in rng.sample(range(len(request)), rng.randint(1, 3)):
            data, how = mutate(request[k][1], rng)
            request[k] = (request[k][0], data)
            what.append(f"{request[k][0]}: {how}")
        yield request, f"fuzz {n}: " + "; ".join(what)


def test_fuzzed_headers_in_process(dicom_patient):
    """The preprocess step (reading + preparing) answers every mutated request with a result or an InputError, in time."""
    files = read_patient_files(dicom_patient)
    outcomes = {"diagnosable": 0, "refused": 0}
    for request, what in fuzz_requests(files, FUZZ_CASES, FUZZ_SEED):
        with deadline(DEADLINE_S, what):
            try:
                steps.preprocess(request, None, TINY.replace(serving=LIMITED_SERVING))
                outcomes["diagnosable"] += 1
            except InputError:
                outcomes["refused"] += 1
            except Exception as e:  # anything else is a bug the server would report as INTERNAL
                pytest.fail(f"{what}: {type(e).__name__}: {e}")
    assert outcomes["diagnosable"] > 0 and outcomes["refused"] > 0, outcomes  # the mutations hit both ways


@pytest.mark.server
def test_fuzzed_headers_served(limited_server, dicom_patient):
    """Mutated requests through the real server, eight in flight: each a diagnosis or INVALID_ARGUMENT before the
    deadline (never INTERNAL, never a timeout); the server stays ready."""
    files = read_patient_files(dicom_patient)
    requests = list(fuzz_requests(files, FUZZ_SERVED, FUZZ_SEED + 1))

    async def run():
        async with grpcclient_aio.InferenceServerClient(limited_server.grpc_url) as c:
            gate = asyncio.Semaphore(8)

            async def one(request):
                async with gate:
                    try:
                        await c.infer(ENSEMBLE_NAME, build_inputs(request, None, grpcclient_aio), client_timeout=SERVED_DEADLINE_S)
                        return "ok", ""
                    except InferenceServerException as e:
                        return e.status(), e.message()
            return await asyncio.gather(*[one(r) for r, _ in requests])

    outcomes = asyncio.run(run())
    bad = [(what, status, message) for (_, what), (status, message) in zip(requests, outcomes)
           if status not in ("ok", "StatusCode.INVALID_ARGUMENT")]
    assert not bad, bad
    assert limited_server.is_ready()


def test_struct_of_corpus_jpeg_is_what_the_case_says():
    """The JPEG case's SOF really declares 30000 x 30000 (the crafted file is what cases.json describes)."""
    data = (CORPUS / "jpeg_sof_huge" / "jpeg.dcm").read_bytes()
    at = data.index(b"\xff\xc0")
    assert struct.unpack_from(">HH", data, at + 5) == (30000, 30000)
