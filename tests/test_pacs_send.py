"""wff.pacs.send: the status mapping, and C-STORE / STOW-RS of an SR and a presentation state into a
real Orthanc (tests/orthanc.py), a pynetdicom SCP answering chosen statuses, and an HTTP server
answering chosen STOW-RS statuses."""

from __future__ import annotations

import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import dicom_slice
from orthanc import orthanc  # noqa: F401  (fixture)
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage, MRImageStorage, generate_uid

from wff.pacs.send import (
    CStoreSender,
    PermanentSendError,
    StowSender,
    TransientSendError,
    cstore_status_error,
    http_status_error,
    parse_destination,
)

CALLING_AE = "WFFGW"


def mr_datasets(n: int = 2) -> list[pydicom.Dataset]:
    """``n`` slices of one synthetic MR series, with the type 2 patient/study attributes an SR copies."""
    uids = {"study": generate_uid(), 1: generate_uid()}
    out = []
    for i in range(n):
        ds = pydicom.dcmread(io.BytesIO(dicom_slice(np.full((16, 16), 100 * i), 1, "SAG T2", i, 60, uids)))
        ds.PatientBirthDate = ds.PatientSex = ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.StudyDate, ds.StudyTime = "20260101", "120000"
        out.append(ds)
    return out


def result_objects(mr: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """A small TID 1500 Comprehensive SR and a GSPS over ``mr``, as the gateway sends them."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="finding 1"),
        finding_type=codes.SCT.Neoplasm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.Finding, codes.SCT.Malignant)],
    )
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(), imaging_measurements=[group],
                                     procedure_reported=codes.LN.MRIUnspecifiedBodyRegion)
    sr = hd.sr.ComprehensiveSR(evidence=mr, content=report, series_instance_uid=generate_uid(), series_number=901,
                               sop_instance_uid=generate_uid(), instance_number=1, manufacturer="wff tests")
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=mr, series_instance_uid=generate_uid(), series_number=902, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="wff tests", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0", content_label="WFF")
    return [sr, pr]


def stored_sop_classes(orthanc, study_uid: str) -> list[str]:
    study = orthanc.study_id(study_uid)
    if study is None:
        return []
    return sorted(orthanc.get(f"/instances/{i['ID']}/tags", simplify="")["SOPClassUID"]
                  for i in orthanc.get(f"/studies/{study}/instances"))


class TestParseDestination:
    def test_valid(self):
        """AET@HOST:PORT splits into its three parts; an IPv6 host may be bracketed."""
        d = parse_destination("PACS@10.0.0.5:104")
        assert (d.ae_title, d.host, d.port) == ("PACS", "10.0.0.5", 104)
        assert parse_destination("A@[::1]:11112").host == "::1"

    @pytest.mark.parametrize("text, match", [
        ("PACS10.0.0.5:104", "no '@'"),
        ("PACS@10.0.0.5", "no HOST:PORT"),
        ("PACS@host:abc", "not a number"),
        ("PACS@host:70000", "outside 1-65535"),
        ("@host:104", "is empty"),
        ("THIS_AE_TITLE_IS_TOO_LONG@host:104", "at most 16"),
        ("BAD\\AE@host:104", "without backslash"),
    ])
    def test_invalid(self, text, match):
        """Each malformed destination names what is wrong."""
        with pytest.raises(ValueError, match=match):
            parse_destination(text)


class TestStatusMapping:
    @pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB007, 0xB006])
    def test_cstore_success_and_warnings(self, status):
        """Success and the coercion warnings count as stored."""
        assert cstore_status_error(status, "P@h:1", ComprehensiveSRStorage) is None

    @pytest.mark.parametrize("status, kind", [
        (0xA700, TransientSendError), (0xA7FF, TransientSendError),
        (0xA900, PermanentSendError), (0xC000, PermanentSendError), (0xC123, PermanentSendError),
        (0x0122, PermanentSendError), (0x0124, PermanentSendError), (0x0110, PermanentSendError),
    ])
    def test_cstore_failures(self, status, kind):
        """Out of resources is transient, every other failure permanent; the message names destination and status."""
        error = cstore_status_error(status, "PACS@h:104", GrayscaleSoftcopyPresentationStateStorage)
        assert type(error) is kind and error.status == status
        assert f"0x{status:04X}" in str(error) and "PACS@h:104" in str(error) and "Presentation State" in str(error)

    @pytest.mark.parametrize("status, kind", [
        (200, None), (500, TransientSendError), (503, TransientSendError), (429, TransientSendError), (408, TransientSendError),
        (400, PermanentSendError), (401, PermanentSendError), (403, PermanentSendError), (404, PermanentSendError),
        (409, PermanentSendError), (413, PermanentSendError), (501, PermanentSendError),
    ])
    def test_http(self, status, kind):
        """STOW-RS: 5xx (but 501/505), 408 and 429 are transient, other 4xx permanent."""
        error = http_status_error(status, "http://pacs/dicom-web/studies")
        assert (error is None and kind is None) or (type(error) is kind and f"HTTP {status}" in str(error))


class TestOrthanc:
    def test_cstore(self, orthanc):
        """C-STORE of an SR and a GSPS ends up in Orthanc; a second send of the same objects keeps one copy each."""
        mr = mr_datasets()
        sender, objects = CStoreSender(orthanc.address, CALLING_AE), result_objects(mr)
        sender.send(objects)
        sender.send(objects)
        assert stored_sop_classes(orthanc, mr[0].StudyInstanceUID) == sorted([ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage])

    def test_stow(self, orthanc):
        """STOW-RS of an SR and a GSPS ends up in Orthanc."""
        mr = mr_datasets()
        StowSender(orthanc.dicomweb).send(result_objects(mr))
        assert stored_sop_classes(orthanc, mr[0].StudyInstanceUID) == sorted([ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage])

    def test_wrong_port_is_transient(self, orthanc):
        """Nothing listening at the port: TransientSendError naming the destination."""
        closed = f"{orthanc.ae_title}@127.0.0.1:{_closed_port()}"
        with pytest.raises(TransientSendError, match="connection refused") as info:
            CStoreSender(closed, CALLING_AE, timeout_s=5).send(result_objects(mr_datasets(1)))
        assert closed in str(info.value)

    def test_unknown_called_ae_is_permanent(self, orthanc):
        """Orthanc (DicomCheckCalledAet) rejects another called AE title: PermanentSendError, nothing stored."""
        mr = mr_datasets(1)
        wrong = orthanc.address.replace(orthanc.ae_title, "NOT_ORTHANC")
        with pytest.raises(PermanentSendError, match="Called AE title not recognised"):
            CStoreSender(wrong, CALLING_AE).send(result_objects(mr))
        assert stored_sop_classes(orthanc, mr[0].StudyInstanceUID) == []

    def test_stow_wrong_path_is_permanent(self, orthanc):
        """A URL that is not a DICOMweb root answers 404: permanent."""
        with pytest.raises(PermanentSendError, match="HTTP 404"):
            StowSender(f"{orthanc.url}/not-dicom-web").send(result_objects(mr_datasets(1)))

    def test_stow_refused_connection_is_transient(self):
        """No HTTP server at the port: transient."""
        with pytest.raises(TransientSendError, match="retrying later"):
            StowSender(f"http://127.0.0.1:{_closed_port()}/dicom-web", timeout_s=5).send(result_objects(mr_datasets(1)))


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scp():
    """A pynetdicom storage SCP for the SR SOP classes only, answering C-STORE with ``scp.status`` (a list)."""
    from pynetdicom import AE, evt

    status = [0x0000]
    ae = AE(ae_title="TESTSCP")
    for sop_class in (ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage):
        ae.add_supported_context(sop_class)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status[0])])
    server.status = status
    server.address = f"TESTSCP@127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


class TestScpStatuses:
    def test_out_of_resources_is_transient(self, scp):
        """0xA700 from the SCP: TransientSendError with the status."""
        scp.status[0] = 0xA700
        with pytest.raises(TransientSendError, match="0xA700") as info:
            CStoreSender(scp.address, CALLING_AE).send(result_objects(mr_datasets(1)))
        assert info.value.status == 0xA700

    def test_mismatch_is_permanent(self, scp):
        """0xA900 from the SCP: PermanentSendError."""
        scp.status[0] = 0xA900
        with pytest.raises(PermanentSendError, match="0xA900"):
            CStoreSender(scp.address, CALLING_AE).send(result_objects(mr_datasets(1)))

    def test_unsupported_sop_class_is_permanent(self, scp):
        """An object of a SOP class the SCP did not accept (MR here): PermanentSendError naming the class."""
        with pytest.raises(PermanentSendError, match="did not accept MR Image Storage"):
            CStoreSender(scp.address, CALLING_AE).send(mr_datasets(1))

    def test_no_answer_is_transient(self):
        """A peer that accepts the TCP connection but never answers: transient after the timeout."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            with pytest.raises(TransientSendError, match="no answer within 1 s"):
                CStoreSender(f"SILENT@127.0.0.1:{silent.getsockname()[1]}", CALLING_AE, timeout_s=1).send(result_objects(mr_datasets(1)))


@pytest.fixture
def stow_server():
    """An HTTP server answering every POST with ``stow_server.answer`` = (status, JSON body or None)."""
    answer = [(200, None)]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answer[0]
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.answer = answer
    server.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    yield server
    server.shutdown()
    server.server_close()


def failed(reason: int) -> dict:
    return {"00081198": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": [MRImageStorage]},
                                                 "00081197": {"vr": "US", "Value": [reason]}}]}}


class TestStowAnswers:
    @pytest.mark.parametrize("status, body, kind", [
        (200, {}, None),
        (202, {"00081196": {"vr": "US", "Value": [0xB000]}}, None),  # stored with warnings
        (202, failed(0xA700), TransientSendError),
        (202, failed(0xC000), PermanentSendError),
        (409, failed(0xA900), PermanentSendError),
        (409, failed(0xA700), TransientSendError),
        (503, None, TransientSendError),
        (415, None, PermanentSendError),
    ])
    def test_answer(self, stow_server, status, body, kind):
        """The HTTP status and the FailedSOPSequence's failure reasons decide the error."""
        stow_server.answer[0] = (status, body)
        sender = StowSender(stow_server.url)
        if kind is None:
            sender.send(result_objects(mr_datasets(1)))
        else:
            with pytest.raises(kind, match=stow_server.url):
                sender.send(result_objects(mr_datasets(1)))
