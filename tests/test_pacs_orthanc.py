"""End to end: a real Orthanc as the PACS, the real tritonserver with the tiny profile's models and
`wff pacs listen` / `wff pacs watch` as separate processes.

Orthanc receives a synthetic patient from storescu and sends the study to the gateway (REST
POST /modalities/gateway/store, as an operator or an auto-routing rule would); the gateway
diagnoses it and stores an SR and a presentation state back. Everything is checked through
Orthanc: its DICOMweb for the SR's content (read with highdicom) and series, dciodvfy for the
objects' conformance. The round trip runs at the gateway's default settings and prints the time
from the last instance received to the SR stored in Orthanc (BENCHMARKS.md).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from click.testing import CliRunner
from conftest import embedded_server, write_dicom_patient
from orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from pydicom.sr.coding import Code

from wff.cli import main
from wff.pacs.dicomweb import multipart_parts
from wff.processes import free_port, stop_process_group

GATEWAY_AE = "SPINE_WFF"
MODALITY = "gateway"  # the gateway's name in Orthanc's DicomModalities
DEFAULT_QUIET_S = 10.0  # wff pacs listen's default --quiet-seconds (GatewaySettings.quiet_seconds)
QUICK_QUIET_S = "1"  # --quiet-seconds of the gateways that need not wait like the default
START_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 60.0
SETTLE_S = 2.0  # how long a test waits to see that nothing more happens (beyond the quick quiet time)
SERIES = {"SAG T1": 5, "SAG T2": 5, "SAG STIR": 5}
# identifiers that must not appear in the gateway's audit log or its output
PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "Quayle^Ottoline^Maud", "MRN-5520419", "19610203"
# the README's auto-routing rule: once a study has had no new instance for StableAge seconds, Orthanc
# sends its MR series to the gateway. The event fires again after the gateway stored its results.
ROUTING_RULE = """
function OnStableStudy(studyId, tags, metadata)
  local mr = {}
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if series['MainDicomTags']['Modality'] == 'MR' then
      table.insert(mr, series['ID'])
    end
  end
  if #mr > 0 then
    RestApiPost('/modalities/spine-wff/store', DumpJson({Resources = mr, Asynchronous = true}))
  end
end
"""
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")
CLASSIFICATION = Code("278201002", "SCT", "Classification")


def make_patient(folder: Path, seed: int) -> tuple[Path, str, list[str]]:
    """A synthetic three-series MR patient with identifying attributes set: (folder, StudyInstanceUID, SOP Instance UIDs)."""
    write_dicom_patient(folder, SERIES, seed=seed)
    study_uid, sop_uids = None, []
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.PatientSex, ds.StudyDate, ds.StudyTime = "F", "20260105", "101500"
        ds.save_as(path, enforce_file_format=True)
        study_uid = ds.StudyInstanceUID
        sop_uids.append(ds.SOPInstanceUID)
    return folder, study_uid, sop_uids


def storescu(orthanc, folder: Path) -> None:
    """The patient's files into Orthanc with DCMTK's storescu."""
    subprocess.run(["storescu", "-aet", "MODALITY", "-aec", orthanc.ae_title, "+sd", "+r", "+sp", "*.dcm",
                    "127.0.0.1", str(orthanc.dicom_port), str(folder)], check=True, capture_output=True, timeout=60)


class PacsProcess:
    """``wff pacs ARGS`` in its own process group, its output in ``log_path``."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args, self.log_path = args, log_path
        self.process: subprocess.Popen | None = None

    def start(self, port: int | None = None) -> "PacsProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "wff", "pacs", *self.args], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if port is not None:
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                self.check_running()
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        return self
                time.sleep(0.1)
            raise AssertionError(f"wff pacs {self.args[0]} did not listen on port {port} within {START_TIMEOUT_S:.0f} s:\n{self.log()}")
        return self

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"wff pacs {self.args[0]} exited with {self.process.returncode}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        code, killed = stop_process_group(self.process, 20)
        if killed:
            raise AssertionError(f"wff pacs {self.args[0]} did not stop on SIGTERM within 20 s:\n{self.log()}")
        return code


server = embedded_server("pacs-repo")


@pytest.fixture(scope="module")
def gateway_state(tmp_path_factory) -> Path:
    """The state folder shared by the listen tests (spool, per-study state, audit log)."""
    return tmp_path_factory.mktemp("gateway-state")


def listen(server, orthanc, state: Path, log_path: Path, *extra: str) -> tuple[PacsProcess, int]:
    """Starts `wff pacs listen` on a free port and points Orthanc's 'gateway' modality at it."""
    port = free_port()
    gateway = PacsProcess(["listen", "--ae-title", GATEWAY_AE, "--port", str(port), "--url", server.grpc_url,
                           "--send-to", orthanc.address, "--allow", orthanc.ae_title, "--state", str(state), *extra], log_path)
    orthanc.add_modality(MODALITY, GATEWAY_AE, port)
    return gateway.start(port), port


def sr_and_pr_series(orthanc, study_uid: str) -> dict[str, list[dict]]:
    """QIDO-RS: the study's series by modality ({"SR": [...], "PR": [...]}), each with its instances."""
    out = {}
    for modality in ("SR", "PR"):
        answer = requests.get(f"{orthanc.dicomweb}/studies/{study_uid}/series", params={"Modality": modality}, timeout=30)
        answer.raise_for_status()
        out[modality] = answer.json() if answer.content else []
    return out


def wait_for_sr(orthanc, study_uid: str, gateway: PacsProcess, timeout_s: float = RESULT_TIMEOUT_S) -> float:
    """Waits until the study holds an SR series in Orthanc; returns the time.monotonic() when it was seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sr_and_pr_series(orthanc, study_uid)["SR"]:
            return time.monotonic()
        gateway.check_running()
        time.sleep(0.1)
    raise AssertionError(f"no SR in Orthanc {timeout_s:.0f} s after the study was sent; gateway output:\n{gateway.log()}")


def retrieve(orthanc, study_uid: str, series_uid: str) -> list[bytes]:
    """WADO-RS: the series' instances as Part 10 bytes."""
    answer = requests.get(f"{orthanc.dicomweb}/studies/{study_uid}/series/{series_uid}", timeout=30,
                          headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    answer.raise_for_status()
    return multipart_parts(answer.headers["Content-Type"], answer.content)


def only_result(orthanc, study_uid: str) -> tuple[bytes, bytes]:
    """The study's one SR and one presentation state (asserting there is exactly one series and instance of each)."""
    series = sr_and_pr_series(orthanc, study_uid)
    found = {}
    for modality, items in series.items():
        assert len(items) == 1, f"{len(items)} {modality} series in the study, expected 1"
        instances = retrieve(orthanc, study_uid, items[0]["0020000E"]["Value"][0])
        assert len(instances) == 1, f"{len(instances)} {modality} instances, expected 1"
        found[modality] = instances[0]
    return found["SR"], found["PR"]


def wff_diagnose(server, folder: Path) -> dict:
    result = CliRunner().invoke(main, ["diagnose", str(folder), "--url", server.grpc_url, "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def read_sr(data: bytes) -> dict:
    """From an SR (highdicom): the classification, P(malignant), and the best box's graphic type and referenced SOP Instance UID."""
    sr = hd.sr.srread(io.BytesIO(data))
    report = sr.content
    out = {}
    for group in report.get_image_measurement_groups():
        for evaluation in group.get_qualitative_evaluations(name=CLASSIFICATION):
            out["classification"] = evaluation.value.meaning.lower()
        for measurement in group.get_measurements(name=PROBABILITY_OF_CANCER):
            out["p_malignant"] = float(measurement.value)
    rois = report.get_planar_roi_measurement_groups()
    if rois:
        roi = rois[0].roi
        out["box_type"] = roi.graphic_type.value
        out["box_sop_uid"] = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return out


def assert_result_matches_wff_diagnose(server, orthanc, study_uid: str, folder: Path, sop_uids: list[str]) -> None:
    """The study's one SR carries `wff diagnose`'s diagnosis and P(malignant) for ``folder``, and its best box is a
    polyline on one of ``sop_uids``."""
    sr, _ = only_result(orthanc, study_uid)
    content = read_sr(sr)
    expected = wff_diagnose(server, folder)
    assert content["classification"] == expected["diagnosis"]
    assert content["p_malignant"] == pytest.approx(expected["p_malignant"], abs=1e-6)
    assert content["box_type"] == "POLYLINE"
    assert content["box_sop_uid"] in sop_uids


def dciodvfy_errors(data: bytes, folder: Path, name: str) -> list[str]:
    path = folder / f"{name}.dcm"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def audit_events(state: Path) -> list[dict]:
    path = state / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for_event(state: Path, event: str, count: int, gateway: PacsProcess, timeout_s: float = RESULT_TIMEOUT_S) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = [e for e in audit_events(state) if e["event"] == event]
        if len(events) >= count:
            return events
        gateway.check_running()
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} {event!r} events in the audit log after {timeout_s:.0f} s:\n{gateway.log()}")


@pytest.fixture(scope="module")
def first_study(server, orthanc, gateway_state, tmp_path_factory):
    """A patient stored into Orthanc and sent to `wff pacs listen` at its default settings, until its SR is in
    Orthanc. Prints the time from the last instance received to the SR stored (BENCHMARKS.md)."""
    folder, study_uid, sop_uids = make_patient(tmp_path_factory.mktemp("patient-a") / "A", seed=11)
    storescu(orthanc, folder)
    logs = tmp_path_factory.mktemp("gateway-logs")
    gateway, _ = listen(server, orthanc, gateway_state, logs / "listen-default.log")
    try:
        orthanc.send_to_modality(MODALITY, [orthanc.study_id(study_uid)])
        last_instance = time.monotonic()  # the synchronous store job returns after the association's release
        stored = wait_for_sr(orthanc, study_uid, gateway)
    finally:
        assert gateway.stop() == 0, gateway.log()
    total = stored - last_instance
    diagnosed = next(e for e in audit_events(gateway_state) if e["event"] == "diagnosed")
    sent = next(e for e in audit_events(gateway_state) if e["event"] == "stored")
    print(f"\nBENCHMARK pacs round trip (default settings, {sum(SERIES.values())} slices of 48 x 48, tiny profile): "
          f"last instance received -> SR stored in Orthanc {total:.2f} s = quiet wait {DEFAULT_QUIET_S:.0f} s + "
          f"{total - DEFAULT_QUIET_S:.2f} s (diagnosis and results {diagnosed['duration_s']:.2f} s, C-STORE "
          f"{sent['duration_s']:.2f} s, rest: the gateway's poll interval and Orthanc's indexing)")
    return {"folder": folder, "study_uid": study_uid, "sop_uids": sop_uids, "seconds": total, "logs": logs}


class TestListen:
    def test_one_sr_matching_wff_diagnose(self, server, orthanc, first_study):
        """The study holds exactly one SR series whose diagnosis and P(malignant) are those of `wff diagnose`
        on the same files, with the best box on a real SOP instance of the study."""
        assert_result_matches_wff_diagnose(server, orthanc, first_study["study_uid"], first_study["folder"], first_study["sop_uids"])
        assert first_study["seconds"] >= DEFAULT_QUIET_S

    def test_dciodvfy(self, orthanc, first_study, tmp_path):
        """dciodvfy reports no error on the SR or the presentation state as Orthanc stores them."""
        sr, pr = only_result(orthanc, first_study["study_uid"])
        assert dciodvfy_errors(sr, tmp_path, "sr") == []
        assert dciodvfy_errors(pr, tmp_path, "pr") == []

    def test_resend_and_stored_results_start_nothing(self, server, orthanc, gateway_state, first_study):
        """The study sent again, now with its SR and presentation state (what a stable-study routing rule does
        after the results arrive), to the restarted gateway: no second diagnosis, still one SR."""
        gateway, _ = listen(server, orthanc, gateway_state, first_study["logs"] / "listen-resend.log", "--quiet-seconds", QUICK_QUIET_S)
        try:
            received_before = len([e for e in audit_events(gateway_state) if e["event"] == "received"])
            # the MR series, then the results: the gateway's SCP refuses SR and PR at negotiation, so that store fails
            study_id = orthanc.study_id(first_study["study_uid"])
            mr_series = [s["ID"] for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"].get("Modality") == "MR"]
            orthanc.send_to_modality(MODALITY, mr_series)
            results = [s["ID"] for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"].get("Modality") != "MR"]
            with pytest.raises(RuntimeError, match="HTTP"):
                orthanc.send_to_modality(MODALITY, results)
            wait_for_event(gateway_state, "received", received_before + 1, gateway)
            time.sleep(float(QUICK_QUIET_S) + SETTLE_S)
        finally:
            assert gateway.stop() == 0, gateway.log()
        events = audit_events(gateway_state)
        assert [e["event"] for e in events].count("diagnosed") == 1
        assert [e["event"] for e in events].count("stored") == 1
        only_result(orthanc, first_study["study_uid"])

    def test_audit_log_has_no_identifiers(self, gateway_state, first_study):
        """Neither the audit log nor the gateway's output holds the patient's name, ID, birth date or the study UID."""
        texts = [(gateway_state / "audit.jsonl").read_text(), *(p.read_text() for p in first_study["logs"].glob("*.log"))]
        for text in texts:
            for identifier in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, BIRTH_DATE, first_study["study_uid"]):
                assert identifier not in text
        assert {"received", "diagnosed", "stored"} <= {e["event"] for e in audit_events(gateway_state)}

    def test_killed_mid_study_then_restarted(self, server, orthanc, tmp_path):
        """SIGKILL after the study was received and before its diagnosis; the restarted gateway stores the result."""
        folder, study_uid, sop_uids = make_patient(tmp_path / "B", seed=12)
        storescu(orthanc, folder)
        state = tmp_path / "state"
        gateway, _ = listen(server, orthanc, state, tmp_path / "listen-1.log", "--quiet-seconds", "600")
        try:
            orthanc.send_to_modality(MODALITY, [orthanc.study_id(study_uid)])
            wait_for_event(state, "received", 1, gateway)
        finally:
            gateway.kill()
        assert not sr_and_pr_series(orthanc, study_uid)["SR"]
        gateway, _ = listen(server, orthanc, state, tmp_path / "listen-2.log", "--quiet-seconds", QUICK_QUIET_S)
        try:
            wait_for_sr(orthanc, study_uid, gateway)
        finally:
            assert gateway.stop() == 0, gateway.log()
        assert_result_matches_wff_diagnose(server, orthanc, study_uid, folder, sop_uids)


class TestWatch:
    def test_dicomweb_watch_with_stow(self, server, orthanc, tmp_path):
        """`wff pacs watch --dicomweb URL --stow URL` finds a new MR study in Orthanc, and its SR arrives by STOW-RS."""
        folder, study_uid, sop_uids = make_patient(tmp_path / "C", seed=13)
        orthanc.clear()
        storescu(orthanc, folder)
        watcher = PacsProcess(["watch", "--dicomweb", orthanc.dicomweb, "--url", server.grpc_url, "--stow", orthanc.dicomweb,
                               "--state", str(tmp_path / "state"), "--quiet-seconds", QUICK_QUIET_S, "--watch-interval", "1"],
                              tmp_path / "watch.log").start()
        try:
            wait_for_sr(orthanc, study_uid, watcher)
            time.sleep(float(QUICK_QUIET_S) + SETTLE_S)  # further polls see the study with its results: nothing new
        finally:
            assert watcher.stop() == 0, watcher.log()
        assert_result_matches_wff_diagnose(server, orthanc, study_uid, folder, sop_uids)
        assert [e["event"] for e in audit_events(tmp_path / "state")].count("diagnosed") == 1


class TestRoutingRule:
    def test_orthanc_forwards_stable_mr_studies(self, server, tmp_path):
        """With the README's Lua rule, a study stored into Orthanc reaches the gateway by itself and its result
        comes back; the stable-study event that fires again after the results were stored starts nothing."""
        port = free_port()
        with Orthanc(tmp_path / "orthanc", modalities={"spine-wff": (GATEWAY_AE, port)}, lua=ROUTING_RULE) as pacs:
            state = tmp_path / "state"
            gateway = PacsProcess(["listen", "--ae-title", GATEWAY_AE, "--port", str(port), "--url", server.grpc_url,
                                   "--send-to", pacs.address, "--allow", pacs.ae_title, "--state", str(state),
                                   "--quiet-seconds", QUICK_QUIET_S], tmp_path / "listen.log").start(port)
            try:
                folder, study_uid, sop_uids = make_patient(tmp_path / "D", seed=14)
                storescu(pacs, folder)
                wait_for_sr(pacs, study_uid, gateway)
                wait_for_event(state, "received", 2, gateway)  # the study again, after StableAge
                time.sleep(float(QUICK_QUIET_S) + SETTLE_S)
            finally:
                assert gateway.stop() == 0, gateway.log()
            sr, _ = only_result(pacs, study_uid)
            assert read_sr(sr)["box_sop_uid"] in sop_uids
        events = audit_events(state)
        assert [e["event"] for e in events].count("diagnosed") == 1
        assert [e["event"] for e in events].count("stored") == 1
        assert [e["duplicates"] for e in events if e["event"] == "received"] == [0, len(sop_uids)]
