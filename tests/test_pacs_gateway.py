"""The PACS gateway (wff.pacs): age, settings, study state and its recovery, backoff, audit, metrics,
and the C-STORE SCP over real loopback associations (pynetdicom as SCU, dcmtk's storescu/echoscu).

The diagnosis, the result objects and the sender are fakes here (FakeDiagnose, fake_results,
FakeSender), so every state transition can be driven and counted; the real tritonserver and
Orthanc path is tests/test_pacs_orthanc.py. ``TestListenCommand`` runs ``wff pacs listen`` itself
against a real tritonserver for its start-up errors and a clean stop.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from conftest import wait_for as shared_wait_for
from conftest import write_dicom_patient
from wff.client.grpc_client import RejectedInput, ServerUnavailable
from wff.pacs.age import dataset_age, files_age, parse_da
from wff.pacs.audit import AuditLog
from wff.pacs.gateway import CHANGED, DUPLICATE, NEW, NOT_MR, OWN_OBJECT, UNREADABLE, Gateway, Watcher
from wff.pacs.metrics import COUNTERS, Metrics, MetricsServer
from wff.pacs.scp import StoreSCP
from wff.pacs.send import PermanentSendError, TransientSendError
from wff.pacs.settings import GatewaySettings
from wff.pacs.store import DEAD_LETTER, DIAGNOSED, RECEIVED, STORED, content_hash
from wff.pacs.uids import derived_uid

PATIENT_NAME, PATIENT_ID = "Doe^Janet", "PID-4711-XYZ"  # identifiers that must never reach the audit log
SCP_AE, ALLOWED_AE = "SPINE_WFF", "MODALITY1"
WAIT_S = 10.0  # longest wait for an association's end to be handled, or a study to be diagnosed


# ---------------------------------------------------------------- fakes and helpers

class Clock:
    """A settable wall clock (seconds since the epoch)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeDiagnose:
    """Records each call's file names and age; raises the queued errors first, then answers a fixed diagnosis."""

    def __init__(self, *errors: Exception, during=None) -> None:
        self.errors = list(errors)
        self.calls: list[tuple[list[str], float | None]] = []
        self.during = during  # called inside the diagnosis (e.g. to store a late instance)

    def __call__(self, files, age):
        self.calls.append(([name for name, _ in files], age))
        if self.during is not None:
            during, self.during = self.during, None
            during()
        if self.errors:
            raise self.errors.pop(0)
        return SimpleNamespace(label="malignant", p_malignant=0.8125)


def fake_results(datasets, diagnosis, *, settings):
    """One SR-class object under the settings' UID root, its UID derived from the sorted SOP Instance UIDs."""
    sops = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    sr = pydicom.Dataset()
    sr.SOPClassUID = ComprehensiveSRStorage
    sr.SOPInstanceUID = derived_uid(settings.uid_root, "test-sr", *sops)
    sr.SeriesInstanceUID = derived_uid(settings.uid_root, "test-series", *sops)
    sr.StudyInstanceUID = datasets[0].StudyInstanceUID
    sr.Modality = "SR"
    sr.PatientName, sr.PatientID = datasets[0].PatientName, datasets[0].PatientID
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return [sr]


class FakeSender:
    """Keeps what it was sent; raises the queued errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.sent: list[list] = []

    def send(self, datasets) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append(list(datasets))


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def mr_files(folder: Path, n: int = 3, size: int = 32, age_years: int | None = 60, seed: int = 0) -> list[bytes]:
    """``n`` MR slices of one new study as Part 10 bytes, with PATIENT_NAME / PATIENT_ID."""
    write_dicom_patient(folder, {"SAG T2": n}, size=size, age_years=age_years, seed=seed)
    out = []
    for path in sorted((folder / "SAG T2").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        out.append(part10(ds))
    return out


def uid_of(data: bytes, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).get(keyword))


def make_settings(tmp_path: Path, **overrides) -> GatewaySettings:
    values = dict(state_dir=tmp_path / "state", host="127.0.0.1", port=0, quiet_seconds=10.0, max_wait_s=300.0,
                  retry_initial_s=5.0, retry_max_s=40.0, max_attempts=4, min_free_mb=0, send_to="PACS@127.0.0.1:4242")
    values.update(overrides)
    return GatewaySettings(**values)


def make_gateway(tmp_path: Path, diagnose=None, sender=None, clock=None, **overrides) -> Gateway:
    return Gateway(make_settings(tmp_path, **overrides), sender or FakeSender(), diagnose=diagnose or FakeDiagnose(),
                   make_results=fake_results, clock=clock or Clock())


def feed(gateway: Gateway, files: list[bytes], calling_ae: str = ALLOWED_AE) -> list[str]:
    return gateway.add_instances([(None, f"{i}.dcm", data) for i, data in enumerate(files)], calling_ae)


def settle(gateway: Gateway, clock: Clock) -> int:
    """Lets the quiet time pass, then polls."""
    clock.advance(gateway.settings.quiet_seconds + 1)
    return gateway.poll()


def audit_lines(gateway: Gateway) -> list[dict]:
    return [json.loads(line) for line in gateway.settings.audit_path.read_text().splitlines()]


def wait_for(condition, timeout_s: float = WAIT_S):
    return shared_wait_for(condition, timeout_s)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[bytes]:
    """Three MR slices of one study (32 x 32, PatientAge 060Y)."""
    return mr_files(tmp_path_factory.mktemp("study") / "P", n=3)


# ---------------------------------------------------------------- age

class TestAge:
    @pytest.mark.parametrize("text, years", [("045Y", 45.0), ("45Y", 45.0), ("006M", 0.5), ("012W", 12 * 7 / 365.25),
                                             ("030D", 30 / 365.25), ("120Y", 120.0), ("000D", 0.0)])
    def test_patient_age_forms(self, text, years):
        """Every DICOM age string unit gives years."""
        assert dataset_age(header(PatientAge=text)) == (pytest.approx(years), "PatientAge")

    @pytest.mark.parametrize("text", ["045X", "Y", "1234Y", "-05Y", "4 5Y", "130Y", "045y5"])
    def test_bad_patient_age_falls_back_to_dates(self, text):
        """A PatientAge that is not an age string, or out of range, gives way to StudyDate - PatientBirthDate."""
        age, source = dataset_age(header(PatientAge=text, PatientBirthDate="19700101", StudyDate="20200101"))
        assert age == pytest.approx(18262 / 365.25)
        assert source == "StudyDate - PatientBirthDate"

    def test_patient_age_wins_over_dates(self):
        assert dataset_age(header(PatientAge="030Y", PatientBirthDate="19700101", StudyDate="20200101"))[0] == 30.0

    def test_dates_when_no_patient_age(self):
        """Without PatientAge the age is the study date minus the birth date, in years."""
        age, _ = dataset_age(header(PatientBirthDate="19800615", StudyDate="20200614"))
        assert 39.99 < age < 40.0

    @pytest.mark.parametrize("birth, study", [("20210101", "20200101"), ("18000101", "20200101"), ("20201301", "20210101"),
                                              ("2020", "20210101"), ("", "20210101"), ("19700101", ""), ("1970010X", "20200101")])
    def test_bad_or_missing_dates_give_none(self, birth, study):
        """A birth date after the study, an age over the limit, an invalid or missing date: no age (the fusion's no-age path)."""
        assert dataset_age(header(PatientBirthDate=birth, StudyDate=study)) == (None, "none")

    def test_parse_da_old_form(self):
        """The retired YYYY.MM.DD form is read as a date."""
        assert parse_da("1970.06.15").isoformat() == "1970-06-15"

    def test_files_age_skips_unreadable_files(self, study):
        """files_age reads the DICOM files' headers; a file that is not DICOM is passed over."""
        assert files_age([("junk", b"not dicom"), ("a.dcm", study[0])]) == (60.0, "PatientAge")

    def test_files_without_age(self, tmp_path):
        """Files with neither PatientAge nor dates give None."""
        files = mr_files(tmp_path / "P", n=1, age_years=None)
        assert files_age([("a.dcm", files[0])]) == (None, "none")


def header(**values) -> pydicom.Dataset:
    """A data set with the given age tags, written as they come (pydicom's warnings on invalid values silenced)."""
    ds = pydicom.Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            ds.add_new(keyword, "AS" if keyword == "PatientAge" else "DA", value)
    return ds


# ---------------------------------------------------------------- settings

class TestSettings:
    @pytest.mark.parametrize("title", ["A", "SPINE_WFF", "X" * 16, " PAD ", "ORTHANC-1.2"])
    def test_good_ae_titles(self, tmp_path, title):
        """1 to 16 printable ASCII characters are an AE title (surrounding spaces dropped)."""
        assert make_settings(tmp_path, ae_title=title).ae_title == title.strip()

    @pytest.mark.parametrize("title, message", [("X" * 17, "17 characters"), ("BAD\\AE", "backslash"), ("BAD\x1bAE", "printable"),
                                                ("    ", "empty"), ("", "empty"), ("ÄRZTE", "ASCII")])
    @pytest.mark.parametrize("field", ["ae_title", "allow"])
    def test_bad_ae_titles(self, tmp_path, title, message, field):
        """Too long, a backslash, a control or non-ASCII character, only spaces: refused, saying which rule."""
        value = (title,) if field == "allow" else title
        with pytest.raises(ValueError, match=message):
            make_settings(tmp_path, **{field: value})

    @pytest.mark.parametrize("send_to", ["PACS@host", "PACS@host:0", "@host:104", "host:104", "PACS@host:port"])
    def test_bad_send_to(self, tmp_path, send_to):
        """--send-to must be AET@HOST:PORT."""
        with pytest.raises(ValueError, match="--send-to"):
            make_settings(tmp_path, send_to=send_to)

    def test_send_to_and_stow_exclude_each_other(self, tmp_path):
        with pytest.raises(ValueError, match="not both"):
            make_settings(tmp_path, stow="http://pacs/dicom-web")

    @pytest.mark.parametrize("since, message", [("24h", "StudyDate has no time of day"), ("20241340", "not a calendar date"),
                                                ("2024-01-01", "give a date YYYYMMDD"), ("d", "give a date YYYYMMDD")])
    def test_bad_since(self, tmp_path, since, message):
        """--since takes YYYYMMDD or Nd; anything else is refused, naming the forms."""
        with pytest.raises(ValueError, match=f"--since '{since}'.*{message}"):
            make_settings(tmp_path, since=since)

    def test_bad_since_is_a_usage_error(self, tmp_path):
        done = subprocess.run([sys.executable, "-m", "wff", "pacs", "watch", "--dicomweb", "http://127.0.0.1:1/dicom-web",
                               "--since", "7days", "--state", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--since '7days': give a date YYYYMMDD (e.g. 20240101) or a number of days Nd" in done.stderr

    def test_retry_pause_doubles_up_to_the_maximum(self, tmp_path):
        """Pauses 5, 10, 20, 40, then capped at retry_max_s (40)."""
        settings = make_settings(tmp_path)
        assert [settings.retry_pause(n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 40.0, 40.0]


# ---------------------------------------------------------------- state transitions

class TestCompleteness:
    def test_study_waits_for_quiet_then_is_diagnosed_and_stored(self, tmp_path, study):
        """received -> (quiet) -> diagnosed -> stored, with the files and the age sent to diagnose."""
        clock, diagnose, sender = Clock(), FakeDiagnose(), FakeSender()
        gateway = make_gateway(tmp_path, diagnose, sender, clock)
        assert [gateway.add_instance(None, f"f{i}", data, ALLOWED_AE) for i, data in enumerate(study)] == [NEW] * 3
        uid = uid_of(study[0])
        clock.advance(9.9)
        assert gateway.poll() == 0 and gateway.studies[uid].status == RECEIVED
        clock.advance(0.2)
        assert gateway.poll() == 1
        state = gateway.studies[uid]
        assert (state.status, state.version) == (STORED, 1)
        assert len(diagnose.calls) == 1 and len(diagnose.calls[0][0]) == 3 and diagnose.calls[0][1] == 60.0
        assert [ds.SOPClassUID for ds in sender.sent[0]] == [ComprehensiveSRStorage]

    def test_max_wait_diagnoses_a_study_that_never_goes_quiet(self, tmp_path):
        """Instances every 5 s (quiet 10 s) are diagnosed max_wait after the first one."""
        clock, diagnose = Clock(), FakeDiagnose()
        gateway = make_gateway(tmp_path, diagnose, clock=clock, max_wait_s=60.0)
        files = mr_files(tmp_path / "P", n=13)
        for data in files[:12]:  # at 0, 5, ..., 55 s
            gateway.add_instance(None, "f", data, ALLOWED_AE)
            assert gateway.poll() == 0
            clock.advance(5.0)
        gateway.add_instance(None, "f", files[12], ALLOWED_AE)  # at 60 s
        assert gateway.poll() == 1 and len(diagnose.calls[0][0]) == 13

    def test_resent_identical_instances_change_nothing(self, tmp_path, study):
        """A resend of the same SOP instances (even with other file meta) after storing makes no new version."""
        clock, diagnose, sender = Clock(), FakeDiagnose(), FakeSender()
        gateway = make_gateway(tmp_path, diagnose, sender, clock)
        feed(gateway, study)
        settle(gateway, clock)
        resent = []
        for data in study:
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.file_meta.SourceApplicationEntityTitle = "OTHER_AE"  # file meta differs, data set does not
            resent.append(part10(ds))
        assert resent[0] != study[0] and content_hash(resent[0]) == content_hash(study[0])
        assert gateway.add_instances([(None, "f", d) for d in resent], "OTHER_AE") == [DUPLICATE] * 3
        clock.advance(3600)
        assert gateway.poll() == 0
        assert (len(diagnose.calls), len(sender.sent), gateway.studies[uid_of(study[0])].version) == (1, 1, 1)

    def test_late_instance_gives_a_new_version_of_all_instances(self, tmp_path):
        """An instance after the result was stored: after quiet again, version 2 made from all four instances."""
        clock, diagnose, sender = Clock(), FakeDiagnose(), FakeSender()
        gateway = make_gateway(tmp_path, diagnose, sender, clock)
        files = mr_files(tmp_path / "P", n=4)
        feed(gateway, files[:3])
        settle(gateway, clock)
        assert gateway.add_instance(None, "late", files[3], ALLOWED_AE) == NEW
        state = gateway.studies[uid_of(files[0])]
        assert state.status == RECEIVED
        settle(gateway, clock)
        assert (state.status, state.version) == (STORED, 2)
        assert [len(names) for names, _ in diagnose.calls] == [3, 4]
        assert sender.sent[0][0].SOPInstanceUID != sender.sent[1][0].SOPInstanceUID

    def test_changed_content_under_the_same_uid_gives_a_new_version(self, tmp_path, study):
        """Same SOP Instance UID with other content: the file is replaced and the study re-diagnosed."""
        clock, diagnose = Clock(), FakeDiagnose()
        gateway = make_gateway(tmp_path, diagnose, clock=clock)
        feed(gateway, study)
        settle(gateway, clock)
        ds = pydicom.dcmread(io.BytesIO(study[0]))
        ds.SeriesDescription = "SAG T2 corrected"
        assert gateway.add_instance(None, "f", part10(ds), ALLOWED_AE) == CHANGED
        settle(gateway, clock)
        state = gateway.studies[uid_of(study[0])]
        assert (state.version, len(state.instances), len(diagnose.calls)) == (2, 3, 2)

    def test_open_association_holds_the_quiet_rule_but_not_max_wait(self, tmp_path, study):
        """A study held by an open association is not quiet however long since its last instance; unheld it is.
        Max wait applies while held."""
        clock = Clock()
        gateway = make_gateway(tmp_path, clock=clock)
        uid = uid_of(study[0])
        gateway.hold(uid)
        feed(gateway, study)
        assert settle(gateway, clock) == 0
        gateway.unhold([uid])
        assert gateway.due() == [uid]
        other = make_gateway(tmp_path / "b", clock=clock)
        other.hold(uid)
        feed(other, study)
        clock.advance(other.settings.max_wait_s)
        assert other.due() == [uid]

    def test_instance_during_diagnosis_supersedes_its_result(self, tmp_path):
        """An instance stored while the study is being diagnosed: that result is dropped, the next one has every instance."""
        clock, sender = Clock(), FakeSender()
        files = mr_files(tmp_path / "P", n=3)
        gateway = make_gateway(tmp_path, None, sender, clock)
        gateway._diagnose = FakeDiagnose(during=lambda: gateway.add_instance(None, "late", files[2], ALLOWED_AE))
        feed(gateway, files[:2])
        settle(gateway, clock)
        state = gateway.studies[uid_of(files[0])]
        assert (state.status, state.version, sender.sent) == (RECEIVED, 0, [])
        settle(gateway, clock)
        assert (state.status, state.version) == (STORED, 1)
        assert [len(names) for names, _ in gateway._diagnose.calls] == [2, 3]
        assert [e["event"] for e in audit_lines(gateway)].count("superseded") == 1


class TestInputFilter:
    def test_own_results_and_other_sop_classes_are_never_input(self, tmp_path, study):
        """The SR the gateway made, an MR object under its UID root, a CT image and junk bytes: none starts a diagnosis."""
        clock, diagnose, sender = Clock(), FakeDiagnose(), FakeSender()
        gateway = make_gateway(tmp_path, diagnose, sender, clock)
        feed(gateway, study)
        settle(gateway, clock)
        own_sr = part10(sender.sent[0][0])
        own_mr = pydicom.dcmread(io.BytesIO(study[0]))
        own_mr.SOPInstanceUID = derived_uid(gateway.settings.uid_root, "an MR the gateway would never make")
        own_mr.file_meta.MediaStorageSOPInstanceUID = own_mr.SOPInstanceUID
        ct = pydicom.dcmread(io.BytesIO(study[0]))
        ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        outcomes = gateway.add_instances([(None, "sr", own_sr), (None, "mr", part10(own_mr)), (None, "ct", part10(ct)),
                                          (None, "junk", b"\0" * 200)], "PACS")
        assert outcomes == [NOT_MR, OWN_OBJECT, NOT_MR, UNREADABLE]
        clock.advance(3600)
        assert gateway.poll() == 0 and len(diagnose.calls) == 1
        assert gateway.metrics.value("wff_pacs_instances_ignored_total", reason="not an MR image") == 2

    def test_watch_path_filters_the_same_way(self, tmp_path, study):
        """A DICOMweb study holding the gateway's SR: only the MR instances are taken, once."""
        clock, diagnose, sender = Clock(), FakeDiagnose(), FakeSender()
        gateway = make_gateway(tmp_path, diagnose, sender, clock)
        uid = uid_of(study[0])
        source = SimpleNamespace(new_studies=lambda: [uid], retrieve=lambda u: [(f"{i}.dcm", d) for i, d in enumerate(study)])
        watcher = Watcher(source, gateway, interval_s=30)
        assert watcher.fetch() == 3
        settle(gateway, clock)
        own_sr = part10(sender.sent[0][0])
        source.retrieve = lambda u: [*((f"{i}.dcm", d) for i, d in enumerate(study)), ("sr.dcm", own_sr)]
        assert watcher.fetch() == 0
        clock.advance(3600)
        assert gateway.poll() == 0 and len(diagnose.calls) == 1


# ---------------------------------------------------------------- retries, dead letters, restart

class TestRetries:
    def test_server_down_retries_with_bounded_backoff_then_dead_letter(self, tmp_path, study):
        """ServerUnavailable on every attempt: pauses 5, 10, 20, 40, 40 (capped), then a dead letter after max_attempts (6)."""
        clock = Clock()
        diagnose = FakeDiagnose(*[ServerUnavailable("no server answered", "UNAVAILABLE")] * 10)
        gateway = make_gateway(tmp_path, diagnose, clock=clock, max_attempts=6)
        feed(gateway, study)
        uid = uid_of(study[0])
        clock.advance(11)
        pauses = []
        for _ in range(10):
            gateway.poll()
            state = gateway.studies[uid]
            if state.status == DEAD_LETTER:
                break
            pauses.append(state.next_attempt_at - clock.now)
            clock.advance(pauses[-1] - 0.01)
            assert gateway.poll() == 0  # not before the pause is over
            clock.advance(0.01)
        assert pauses == [5.0, 10.0, 20.0, 40.0, 40.0]
        assert len(diagnose.calls) == 6
        assert state.dead_letter["stage"] == "diagnose" and state.dead_letter["reason"] == "no answer from the server"
        assert gateway.metrics.value("wff_pacs_retries_total", stage="diagnose") == 5
        assert gateway.metrics.value("wff_pacs_dead_letters_total", stage="diagnose") == 1
        events = [e for e in audit_lines(gateway) if e["event"] in ("retry", "dead-letter")]
        assert [e["event"] for e in events] == ["retry"] * 5 + ["dead-letter"]
        assert max(e.get("pause_s", 0) for e in events) <= gateway.settings.retry_max_s

    def test_server_back_before_the_limit(self, tmp_path, study):
        """Two failures, then the server answers: stored, no dead letter."""
        clock, sender = Clock(), FakeSender()
        diagnose = FakeDiagnose(ServerUnavailable("down", "UNAVAILABLE"), ServerUnavailable("down", "UNAVAILABLE"))
        gateway = make_gateway(tmp_path, diagnose, sender, clock)
        feed(gateway, study)
        for _ in range(3):
            clock.advance(60)
            gateway.poll()
        assert gateway.studies[uid_of(study[0])].status == STORED and len(sender.sent) == 1

    def test_rejected_input_is_a_dead_letter_at_once(self, tmp_path, study):
        """The server refusing the study's content is permanent: no retry."""
        diagnose = FakeDiagnose(RejectedInput("rejected by the server: no usable sagittal series", "INVALID_ARGUMENT"))
        clock = Clock()
        gateway = make_gateway(tmp_path, diagnose, clock=clock)
        feed(gateway, study)
        settle(gateway, clock)
        state = gateway.studies[uid_of(study[0])]
        assert state.status == DEAD_LETTER and state.attempts == 1
        assert state.dead_letter["reason"] == "rejected input: no_usable_series"

    def test_send_failures(self, tmp_path, study):
        """A transient send failure is retried without diagnosing again; a permanent one is a dead letter of stage send."""
        clock, diagnose = Clock(), FakeDiagnose()
        sender = FakeSender(TransientSendError("0xA700", "PACS@x:1", 0xA700), PermanentSendError("rejected", "PACS@x:1"))
        gateway = make_gateway(tmp_path, diagnose, sender, clock)
        feed(gateway, study)
        settle(gateway, clock)
        state = gateway.studies[uid_of(study[0])]
        assert (state.status, state.attempts, state.next_attempt_at - clock.now) == (DIAGNOSED, 1, 5.0)
        clock.advance(5)
        gateway.poll()
        assert state.status == DEAD_LETTER and state.dead_letter["stage"] == "send" and len(diagnose.calls) == 1
        assert gateway.retry_dead_letters() == 1
        gateway.poll()
        assert state.status == STORED and len(sender.sent) == 1 and len(diagnose.calls) == 1

    def test_new_instance_revives_a_dead_letter(self, tmp_path):
        """A dead letter that gets a new instance is diagnosed again."""
        clock = Clock()
        files = mr_files(tmp_path / "P", n=3)
        diagnose = FakeDiagnose(RejectedInput("rejected by the server: bad", "INVALID_ARGUMENT"))
        gateway = make_gateway(tmp_path, diagnose, clock=clock)
        feed(gateway, files[:2])
        settle(gateway, clock)
        gateway.add_instance(None, "f", files[2], ALLOWED_AE)
        settle(gateway, clock)
        assert gateway.studies[uid_of(files[0])].status == STORED


class TestRestart:
    def test_study_received_before_a_crash_is_finished_after_restart(self, tmp_path, study):
        """Instances taken, then the process dies before the quiet time: a new Gateway on the same state finishes the study."""
        clock = Clock()
        first = make_gateway(tmp_path, clock=clock)
        feed(first, study)
        leftover = first.spool.incoming / "0123456789abcdef.tmp"  # a write the crash interrupted
        leftover.write_bytes(study[0][:1000])
        first.close()  # as the process ending would
        clock.advance(11)
        diagnose, sender = FakeDiagnose(), FakeSender()
        second = make_gateway(tmp_path, diagnose, sender, clock)
        assert second.recover() == {RECEIVED: 1, DIAGNOSED: 0, STORED: 0, DEAD_LETTER: 0}
        assert not leftover.exists() and not list(second.spool.incoming.iterdir())
        assert audit_lines(second)[-1]["unfinished_writes"] == 1
        second.poll()
        assert second.studies[uid_of(study[0])].status == STORED and len(diagnose.calls[0][0]) == 3 and len(sender.sent) == 1

    def test_results_made_before_a_crash_are_sent_after_restart_without_diagnosing_again(self, tmp_path, study):
        """Diagnosed, send failed, crash: after restart the results on disk are sent; the server is not asked again."""
        clock = Clock()
        first = make_gateway(tmp_path, FakeDiagnose(), FakeSender(TransientSendError("refused", "PACS@x:1")), clock)
        feed(first, study)
        settle(first, clock)
        sr_uid = first.spool.read_results(first.studies[uid_of(study[0])])[0].SOPInstanceUID
        first.close()  # as the process ending would
        clock.advance(6)
        diagnose, sender = FakeDiagnose(), FakeSender()
        second = make_gateway(tmp_path, diagnose, sender, clock)
        assert second.recover()[DIAGNOSED] == 1
        second.poll()
        assert diagnose.calls == [] and [ds.SOPInstanceUID for ds in sender.sent[0]] == [sr_uid]
        assert second.studies[uid_of(study[0])].status == STORED

    def test_state_is_written_atomically_and_a_bad_state_file_is_reported(self, tmp_path, study, caplog):
        """No temp files stay behind; an unreadable state.json is named in a warning, the other studies load."""
        gateway = make_gateway(tmp_path)
        feed(gateway, study)
        other = mr_files(tmp_path / "Q", n=1, seed=1)
        gateway.add_instance(None, "g", other[0], ALLOWED_AE)
        assert not list(gateway.spool.root.rglob("*.tmp"))
        broken = gateway.spool.study_dir(uid_of(other[0])) / "state.json"
        broken.write_text("{not json")
        gateway.close()
        again = make_gateway(tmp_path)
        assert list(again.studies) == [uid_of(study[0])]
        assert str(broken) in caplog.text

    def test_one_process_per_state_folder(self, tmp_path):
        """A second gateway on a state folder in use is refused, naming the folder; after close it may start."""
        first = make_gateway(tmp_path)
        with pytest.raises(OSError, match=f"the state folder {re.escape(str(tmp_path / 'state'))} is in use"):
            make_gateway(tmp_path)
        first.close()
        make_gateway(tmp_path).close()

    def test_stored_studies_are_purged_after_keep_hours(self, tmp_path, study):
        clock = Clock()
        gateway = make_gateway(tmp_path, clock=clock, keep_hours=1.0)
        feed(gateway, study)
        settle(gateway, clock)
        folder = gateway.spool.study_dir(uid_of(study[0]))
        assert gateway.spool.size() == _bytes_under(gateway.spool.studies) > 0
        clock.advance(3500)
        gateway.poll()
        assert folder.exists()
        clock.advance(200)
        gateway.poll()
        assert not folder.exists() and gateway.studies == {} and gateway.spool.size() == _bytes_under(gateway.spool.studies) == 0


def _bytes_under(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- audit and metrics

class TestAudit:
    def test_audit_log_carries_no_identifiers(self, tmp_path, study):
        """A full run (received, retry, diagnosed, stored, duplicate resend): no PatientName, PatientID or study UID in clear."""
        clock = Clock()
        diagnose = FakeDiagnose(ServerUnavailable("no server answered", "UNAVAILABLE"))
        gateway = make_gateway(tmp_path, diagnose, clock=clock)
        feed(gateway, study)
        for _ in range(2):
            settle(gateway, clock)
        feed(gateway, study)
        text = gateway.settings.audit_path.read_text()
        lines = audit_lines(gateway)
        uid = uid_of(study[0])
        sop_uids = [uid_of(d, "SOPInstanceUID") for d in study]
        for secret in (PATIENT_NAME, PATIENT_ID, "Doe", "4711", uid, *sop_uids):
            assert secret not in text
        refs = {e["study"] for e in lines if "study" in e}
        assert refs == {gateway.audit.study_ref(uid)} and re.fullmatch(r"[0-9a-f]{16}", refs.pop())
        assert {"received", "retry", "diagnosed", "stored"} <= {e["event"] for e in lines}
        stored = next(e for e in lines if e["event"] == "stored")
        assert stored["since_last_instance_s"] >= 0 and stored["version"] == 1

    def test_study_hash_is_salted_per_state_folder(self, tmp_path, study):
        """Two state folders give the same UID different references, and neither is the unsalted hash."""
        import hashlib

        uid = uid_of(study[0])
        refs = []
        for folder in ("a", "b", "a"):
            gateway = make_gateway(tmp_path / folder)
            refs.append(gateway.audit.study_ref(uid))
            gateway.close()
        assert refs[0] != refs[1] and hashlib.sha256(uid.encode()).hexdigest()[:16] not in refs
        assert refs[2] == refs[0]  # stable across restarts

    def test_audit_file_not_writable(self, tmp_path):
        (tmp_path / "dir").mkdir()
        with pytest.raises(OSError, match="audit log"):
            AuditLog(tmp_path / "dir", b"salt")


class TestMetrics:
    def test_exposition_lists_every_counter(self):
        """Prometheus text: HELP and TYPE for every counter, labelled samples, unlabelled ones from 0."""
        metrics = Metrics()
        metrics.inc("wff_pacs_retries_total", stage="diagnose")
        metrics.inc("wff_pacs_retries_total", 2, stage="send")
        text = metrics.exposition()
        for name in COUNTERS:
            assert f"# TYPE {name} counter" in text
        assert 'wff_pacs_retries_total{stage="send"} 2' in text
        assert "wff_pacs_studies_diagnosed_total 0" in text
        with pytest.raises(ValueError, match="labels"):
            metrics.inc("wff_pacs_retries_total")

    def test_served_on_loopback(self):
        """GET /metrics on 127.0.0.1 answers the counters; another path is 404; a taken port is a clear error."""
        metrics = Metrics()
        metrics.inc("wff_pacs_results_stored_total")
        server = MetricsServer(metrics, 0)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                assert "wff_pacs_results_stored_total 1" in response.read().decode()
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
            with pytest.raises(OSError, match=f"metrics port {server.port} on 127.0.0.1 is in use"):
                MetricsServer(metrics, server.port)
        finally:
            server.close()


# ---------------------------------------------------------------- the C-STORE SCP on loopback

@pytest.fixture
def scp_gateway(tmp_path):
    """A Gateway (fake diagnosis) behind a running StoreSCP on 127.0.0.1 that allows ALLOWED_AE only."""
    gateways = []

    def start(**overrides):
        values = {"allow": (ALLOWED_AE,), "ae_title": SCP_AE, **overrides}
        gateway = make_gateway(tmp_path / f"g{len(gateways)}", clock=time.time, **values)
        scp = StoreSCP(gateway)
        scp.start()
        gateways.append(scp)
        return gateway, scp

    yield start
    for scp in gateways:
        scp.stop()
        scp.gateway.close()


def associate(port: int, calling: str = ALLOWED_AE, called: str = SCP_AE, sop_classes=(MRImageStorage,)):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
    return ae.associate("127.0.0.1", port, ae_title=called)


def instances_of(gateway: Gateway) -> int:
    return sum(len(s.instances) for s in gateway.studies.values())


def on_disk(gateway: Gateway, study_uid: str) -> dict:
    """The study's instances as its state file on disk lists them, each file present ({} without a state file)."""
    folder = gateway.spool.study_dir(study_uid)
    if not (folder / "state.json").exists():
        return {}
    instances = json.loads((folder / "state.json").read_text())["instances"]
    assert all((folder / "instances" / item["file"]).exists() for item in instances.values())
    return instances


class TestStoreSCP:
    def test_each_instance_is_on_disk_when_answered(self, scp_gateway, study):
        """MR instances from the allowed AE: each answered 0x0000 only once its file and the study's state are on
        disk (before the release); the study waits for the association's end, then for the quiet time."""
        gateway, scp = scp_gateway(quiet_seconds=0.2)
        assoc = associate(scp.port)
        assert assoc.is_established
        for n, data in enumerate(study, start=1):
            assert assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).Status == 0x0000
            assert len(on_disk(gateway, uid_of(data))) == n
        time.sleep(0.5)
        assert gateway.poll() == 0  # quiet for longer than 0.2 s, but the association is open
        assoc.release()
        assert wait_for(lambda: any(e["event"] == "association" for e in audit_lines(gateway)))
        assert wait_for(lambda: gateway.poll() and gateway.studies[uid_of(study[0])].status == STORED)
        assert not list(gateway.spool.incoming.iterdir())
        assert gateway.metrics.value("wff_pacs_instances_received_total", source="dimse") == 3
        association = next(e for e in audit_lines(gateway) if e["event"] == "association")
        assert (association["instances"], association["kept"], association["refused"]) == (3, 3, 0)

    def test_aborted_association_keeps_what_was_answered(self, scp_gateway, study):
        """Instances answered 0x0000, then the sender aborts: they stay, the audit line counts them, the study is
        diagnosed and its results sent after the quiet time."""
        gateway, scp = scp_gateway(quiet_seconds=0.2)
        assoc = associate(scp.port)
        assert [assoc.send_c_store(pydicom.dcmread(io.BytesIO(d))).Status for d in study[:2]] == [0x0000] * 2
        assoc.abort()
        dropped = wait_for(lambda: [e for e in audit_lines(gateway) if e["event"] == "association-dropped"])
        uid = uid_of(study[0])
        assert instances_of(gateway) == 2 and len(on_disk(gateway, uid)) == 2
        assert (dropped[0]["instances"], dropped[0]["kept"]) == (2, 2)
        assert wait_for(lambda: gateway.poll() and gateway.studies[uid].status == STORED)
        assert len(gateway._diagnose.calls[0][0]) == 2 and len(on_disk(gateway, uid)) == 2

    def test_failed_write_answers_out_of_resources(self, scp_gateway, study, monkeypatch):
        """The instance file cannot be written: 0xA700 and nothing taken. The state file cannot be written: 0xA700;
        the same instance sent again is answered 0x0000 only once the state is on disk."""
        gateway, scp = scp_gateway()
        real_put, real_save = gateway.spool.put_instance, gateway.spool.save

        def disk_full(*args):
            raise OSError(28, "No space left on device")

        assoc = associate(scp.port)
        first = pydicom.dcmread(io.BytesIO(study[0]))
        monkeypatch.setattr(gateway.spool, "put_instance", disk_full)
        assert assoc.send_c_store(first).Status == 0xA700
        assert gateway.studies == {}
        monkeypatch.setattr(gateway.spool, "put_instance", real_put)
        monkeypatch.setattr(gateway.spool, "save", disk_full)
        assert assoc.send_c_store(first).Status == 0xA700
        assert on_disk(gateway, uid_of(study[0])) == {}
        monkeypatch.setattr(gateway.spool, "save", real_save)
        assert assoc.send_c_store(first).Status == 0x0000
        assert list(on_disk(gateway, uid_of(study[0]))) == [first.SOPInstanceUID]
        assoc.release()
        association = wait_for(lambda: [e for e in audit_lines(gateway) if e["event"] == "association"])
        assert (association[0]["instances"], association[0]["refused"]) == (1, 2)

    def test_other_calling_ae_is_rejected(self, scp_gateway):
        """A-ASSOCIATE-RJ rejected-permanent, service-user, calling AE title not recognised."""
        gateway, scp = scp_gateway()
        assoc = associate(scp.port, calling="INTRUDER")
        assert assoc.is_rejected
        rsp = assoc.acceptor.primitive
        assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x03)
        assert wait_for(lambda: gateway.metrics.value("wff_pacs_associations_rejected_total", reason="calling AE title not allowed") == 1)

    def test_wrong_called_ae_is_rejected(self, scp_gateway):
        gateway, scp = scp_gateway()
        assoc = associate(scp.port, called="SOMEONE_ELSE")
        assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x07

    def test_any_calling_ae_without_allow(self, scp_gateway):
        gateway, scp = scp_gateway(allow=())
        assoc = associate(scp.port, calling="ANYONE")
        assert assoc.is_established
        assoc.release()

    def test_non_mr_sop_classes_are_rejected_at_negotiation(self, scp_gateway):
        """CT and Comprehensive SR contexts are refused; the MR context is accepted."""
        gateway, scp = scp_gateway()
        assoc = associate(scp.port, sop_classes=(CTImageStorage, ComprehensiveSRStorage, MRImageStorage))
        assert assoc.is_established
        assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == {MRImageStorage}
        assert {cx.abstract_syntax for cx in assoc.rejected_contexts} == {CTImageStorage, ComprehensiveSRStorage}
        assoc.release()

    def test_c_echo(self, scp_gateway):
        from pydicom.uid import UID

        gateway, scp = scp_gateway()
        assoc = associate(scp.port, sop_classes=(UID("1.2.840.10008.1.1"),))
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()

    def test_disk_watermark_refuses_new_associations(self, scp_gateway):
        """Less free disk than --min-free-mb: rejected-transient (service-provider, temporary congestion)."""
        gateway, scp = scp_gateway(min_free_mb=10**12)
        baseline = threading.active_count()
        assoc = associate(scp.port)
        assert assoc.is_rejected
        rsp = assoc.acceptor.primitive
        assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x02, 0x03, 0x01)
        assert gateway.metrics.value("wff_pacs_associations_rejected_total", reason="disk watermark") == 1
        assert wait_for(lambda: threading.active_count() <= baseline)  # the refused association's threads end

    def test_spool_watermark_answers_out_of_resources(self, scp_gateway, tmp_path):
        """With --max-spool-mb 1, once a 1.3 MB instance is held the next C-STORE gets 0xA700."""
        gateway, scp = scp_gateway(max_spool_mb=1)
        big = mr_files(tmp_path / "big", n=2, size=800)
        assoc = associate(scp.port)
        assert [assoc.send_c_store(pydicom.dcmread(io.BytesIO(d))).Status for d in big] == [0x0000, 0xA700]
        assoc.release()
        assert wait_for(lambda: instances_of(gateway) == 1)
        assert associate(scp.port).is_rejected  # and the next association is refused

    def test_port_in_use(self, tmp_path):
        """A second SCP on a taken port: an error naming the port and what to do."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            scp = StoreSCP(make_gateway(tmp_path, port=port))
            with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
                scp.start()


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed (apt install dcmtk)")
class TestDcmtk:
    def _storescu(self, port: int, files: list[Path], *extra: str, calling: str = ALLOWED_AE) -> subprocess.CompletedProcess:
        return subprocess.run(["storescu", "-aet", calling, "-aec", SCP_AE, *extra, "127.0.0.1", str(port), *map(str, files)],
                              capture_output=True, text=True, timeout=60)

    @pytest.fixture
    def files(self, tmp_path, study) -> list[Path]:
        paths = []
        for i, data in enumerate(study):
            paths.append(tmp_path / f"{i}.dcm")
            paths[-1].write_bytes(data)
        return paths

    def test_storescu_allowed_and_other_ae(self, scp_gateway, files):
        """storescu from the allowed AE stores the study; from another AE it fails with the rejection."""
        gateway, scp = scp_gateway()
        done = self._storescu(scp.port, files)
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: instances_of(gateway) == 3)
        refused = self._storescu(scp.port, files, calling="INTRUDER")
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr

    def test_storescu_abort_keeps_what_was_answered(self, scp_gateway, files):
        """storescu --abort ends with an A-ABORT after its C-STOREs were answered: every instance is kept."""
        gateway, scp = scp_gateway()
        done = self._storescu(scp.port, files, "--abort")
        assert done.returncode == 0, done.stderr
        dropped = wait_for(lambda: [e for e in audit_lines(gateway) if e["event"] == "association-dropped"])
        assert instances_of(gateway) == 3 and dropped[0]["kept"] == 3

    def test_storescu_non_mr_is_refused(self, scp_gateway, tmp_path, study):
        """A CT file: no presentation context is accepted for it, storescu reports the failure."""
        gateway, scp = scp_gateway()
        ct = pydicom.dcmread(io.BytesIO(study[0]))
        ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
        (tmp_path / "ct.dcm").write_bytes(part10(ct))
        done = self._storescu(scp.port, [tmp_path / "ct.dcm"], "-R")
        assert done.returncode != 0
        assert instances_of(gateway) == 0

    def test_echoscu(self, scp_gateway):
        gateway, scp = scp_gateway()
        ok = subprocess.run(["echoscu", "-aet", ALLOWED_AE, "-aec", SCP_AE, "127.0.0.1", str(scp.port)], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", SCP_AE, "127.0.0.1", str(scp.port)], capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0

    def test_storescu_refused_above_the_watermark(self, scp_gateway, files):
        gateway, scp = scp_gateway(min_free_mb=10**12)
        done = self._storescu(scp.port, files)
        assert done.returncode != 0 and instances_of(gateway) == 0


# ---------------------------------------------------------------- wff pacs listen, as a process

class FakePacs:
    """A pynetdicom C-STORE SCP that accepts the result SOP classes and keeps what it receives."""

    def __init__(self, ae_title: str = "PACS") -> None:
        from pynetdicom import AE, evt

        from wff.pacs.send import RESULT_SOP_CLASSES

        self.received: list[pydicom.Dataset] = []
        self.ae = AE(ae_title=ae_title)
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_supported_context(sop_class)
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.received.append(event.dataset)
        return 0x0000

    def stop(self) -> None:
        self.ae.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestListenCommand:
    def _listen(self, *args: str, **popen) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "wff", "pacs", "listen", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **popen)

    def _args(self, state: Path, url: str, port: int, pacs_port: int, *extra: str) -> list[str]:
        return ["--ae-title", SCP_AE, "--host", "127.0.0.1", "--port", str(port), "--url", url, "--send-to",
                f"PACS@127.0.0.1:{pacs_port}", "--allow", ALLOWED_AE, "--state", str(state), "--min-free-mb", "0", *extra]

    def test_bad_ae_title_is_a_usage_error(self, tmp_path):
        done = subprocess.run([sys.executable, "-m", "wff", "pacs", "listen", "--ae-title", "WAY_TOO_LONG_AE_TITLE",
                               "--send-to", "PACS@127.0.0.1:104", "--state", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--ae-title 'WAY_TOO_LONG_AE_TITLE' has 21 characters; at most 16" in done.stderr

    def test_unreachable_server(self, tmp_path):
        """No server at --url: exit 1, naming the URL and what to do."""
        url = f"127.0.0.1:{free_port()}"
        done = subprocess.run([sys.executable, "-m", "wff", "pacs", "listen", "--url", url, "--startup-timeout", "1",
                               "--send-to", "PACS@127.0.0.1:104", "--state", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert f"wff: error: no diagnosis server is ready at {url}" in done.stderr and "--url" in done.stderr

    def test_port_in_use(self, tmp_path, limited_server):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = subprocess.run([sys.executable, "-m", "wff", "pacs", "listen",
                                   *self._args(tmp_path, limited_server.grpc_url, port, 104)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and f"wff: error: port {port} on 127.0.0.1 is in use" in done.stderr

    def test_watch_with_unreachable_dicomweb(self, tmp_path, limited_server):
        """wff pacs watch: a DICOMweb server that does not answer at start-up is an error naming --dicomweb."""
        url = f"http://127.0.0.1:{free_port()}/dicom-web"
        done = subprocess.run([sys.executable, "-m", "wff", "pacs", "watch", "--dicomweb", url, "--url", limited_server.grpc_url,
                               "--state", str(tmp_path), "--min-free-mb", "0"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert "wff: error: DICOMweb request to " + url in done.stderr and "check --dicomweb" in done.stderr

    def _kill_and_restart(self, state: Path, url: str, pacs: FakePacs, send) -> None:
        """Starts the gateway (quiet time 600 s), calls ``send(port)``, kills it (SIGKILL) before any result was sent,
        starts it again (quiet time 1 s) until two results reached ``pacs``, then stops it with SIGTERM (exit 0)."""
        port = free_port()
        first = self._listen(*self._args(state, url, port, pacs.port, "--quiet-seconds", "600"))
        try:
            assert wait_for(lambda: _accepts(port) or first.poll() is not None, 60) and first.poll() is None, first.stderr.read()
            send(port)
        finally:
            first.kill()
            first.wait(30)
        assert pacs.received == []
        second = self._listen(*self._args(state, url, port, pacs.port, "--quiet-seconds", "1"))
        try:
            assert wait_for(lambda: len(pacs.received) >= 2 or second.poll() is not None, 120), "no result reached the PACS"
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0, second.stderr.read()
        finally:
            if second.poll() is None:
                second.kill()

    def test_study_received_before_a_kill_is_stored_after_restart(self, tmp_path, limited_server, dicom_patient):
        """storescu a study, kill -9 the gateway before it is complete, start it again: the SR reaches the PACS;
        SIGTERM then stops it with exit 0."""
        pacs, state = FakePacs(), tmp_path / "state"
        files = sorted(p for p in dicom_patient.rglob("*.dcm"))

        def send(port: int) -> None:
            sent = subprocess.run(["storescu", "-aet", ALLOWED_AE, "-aec", SCP_AE, "127.0.0.1", str(port), *map(str, files)],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            assert wait_for(lambda: '"event":"received"' in _read(state / "audit.jsonl"))

        try:
            self._kill_and_restart(state, limited_server.grpc_url, pacs, send)
        finally:
            pacs.stop()
        study_uid = uid_of(files[0].read_bytes())
        assert {str(ds.StudyInstanceUID) for ds in pacs.received} == {study_uid}
        assert len(pacs.received) == 2  # the SR and the presentation state, once
        events = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events if e["event"] in ("started", "recovered", "diagnosed", "stored", "stopped")][-5:] == [
            "recovered", "started", "diagnosed", "stored", "stopped"]
        assert [e["studies"]["received"] for e in events if e["event"] == "recovered"] == [0, 1]
        assert next(e for e in events if e["event"] == "stored")["model_version"]

    def test_instances_answered_before_a_kill_in_an_open_association_are_kept(self, tmp_path, limited_server, dicom_patient):
        """A pynetdicom SCU sends a study and gets 0x0000 for each instance; the gateway is killed (SIGKILL) before
        the association's release. Started again, it diagnoses the study from every answered instance and the
        results reach the PACS."""
        pacs, state = FakePacs(), tmp_path / "state"
        files = sorted(p for p in dicom_patient.rglob("*.dcm"))
        open_associations = []

        def send(port: int) -> None:
            assoc = associate(port)
            assert assoc.is_established
            open_associations.append(assoc)
            assert [assoc.send_c_store(pydicom.dcmread(path)).Status for path in files] == [0x0000] * len(files)

        try:
            self._kill_and_restart(state, limited_server.grpc_url, pacs, send)
        finally:
            pacs.stop()
            for assoc in open_associations:
                assoc.abort()
        assert {str(ds.StudyInstanceUID) for ds in pacs.received} == {uid_of(files[0].read_bytes())}
        events = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
        assert not any(e["event"].startswith("association") for e in events)  # killed before the association ended
        assert [e["studies"]["received"] for e in events if e["event"] == "recovered"] == [0, 1]
        assert [e["instances"] for e in events if e["event"] == "diagnosed"] == [len(files)]

def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
