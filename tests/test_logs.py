"""No patient identifiers and no pixel data in the server log or in client output.

A patient whose identifying tags hold distinctive strings is sent good and bad (a second
patient's file, a malformed birth date, a truncated file, a file without pixels, a NaN age)
through the client API and through ``wff -vv diagnose``; then the tritonserver log of the
shared limited server (run with --log-verbose=1) and everything the client side printed or
logged are searched for those strings and for anything that looks like an array dump.
"""

from __future__ import annotations

import io
import logging
import re
import time

import pydicom
import pytest
from click.testing import CliRunner

from wff.cli import main
from wff.client.grpc_client import DiagnosisClient, DiagnosisError, read_patient_files

NAME = "Zyxwvut^Qponml"
PATIENT_ID = "ZQX-4471-PHI"
OTHER_ID = "ZQX-9902-PHI"
BIRTH_DATE = "19370815"
BAD_BIRTH_DATE = "1937-08-15Q"  # invalid DA: pydicom would quote it when it warns
ADDRESS = "17 Qwertzuiop Lane"
SECRETS = [NAME, NAME.replace("^", " "), "Zyxwvut", "Qponml", PATIENT_ID, OTHER_ID, BIRTH_DATE, "1937-08-15", "Qwertzuiop"]
ARRAY_DUMP = re.compile(r"array\(|(-?\d+(\.\d+)?[,\s]+){40}")  # numpy reprs or long runs of numbers
TIMEOUT_S = 60


def identified(data: bytes, patient_id: str = PATIENT_ID, birth_date: str = BIRTH_DATE) -> bytes:
    from pydicom import config

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName, ds.PatientID, ds.PatientAddress = NAME, patient_id, ADDRESS
    modes = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    config.settings.writing_validation_mode = config.settings.reading_validation_mode = config.IGNORE  # the malformed date, quietly
    try:
        ds.PatientBirthDate = birth_date
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode, config.settings.reading_validation_mode = modes
    return buf.getvalue()


@pytest.fixture(scope="module")
def patient(dicom_patient, tmp_path_factory):
    """The fixture patient with identifying tags, as files on disk (for the CLI) and in memory."""
    folder = tmp_path_factory.mktemp("phi") / "patient"
    files = [(name, identified(data)) for name, data in read_patient_files(dicom_patient)]
    for name, data in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder, files


def requests_good_and_bad(files):
    k = 2
    name, data = files[k]

    def replaced(new):
        return files[:k] + [(name, new)] + files[k + 1:]

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return [
        (files, None, True),
        ([(n, identified(d, birth_date=BAD_BIRTH_DATE)) for n, d in files], None, True),
        (replaced(identified(data, patient_id=OTHER_ID)), None, False),
        (replaced(data[: len(data) // 2]), None, False),
        (replaced(buf.getvalue()), None, False),
        (files, float("nan"), False),
    ]


@pytest.mark.server
def test_no_identifiers_or_pixels_in_logs(limited_server, patient, caplog, capsys):
    """Server log and client output carry neither the patient's identifiers nor array dumps."""
    folder, files = patient
    requests = requests_good_and_bad(files)  # built before logs are captured: building the bad date warns here
    log_before = limited_server.log_file.read_text(errors="replace")
    outcomes = []
    with caplog.at_level(logging.DEBUG):
        with DiagnosisClient(limited_server.grpc_url, timeout_s=TIMEOUT_S) as client:
            for request, age, good in requests:
                try:
                    client.diagnose(request, age)
                    outcomes.append(True)
                except DiagnosisError as e:
                    outcomes.append(False)
                    print(e)  # what a caller would show; captured below
        cli_ok = CliRunner().invoke(main, ["-vv", "diagnose", str(folder), "--url", limited_server.grpc_url, "--json", "-"])
        cli_bad = CliRunner().invoke(main, ["-vv", "diagnose", str(folder), "--url", limited_server.grpc_url, "--age", "nan"])
    assert outcomes == [good for _, _, good in requests]
    assert cli_ok.exit_code == 0 and cli_bad.exit_code == 1, (cli_ok.output, cli_bad.output)
    time.sleep(0.5)  # the server's log lines of the last request
    server_log = limited_server.log_file.read_text(errors="replace")[len(log_before):]
    assert "wff_diagnosis" in server_log and "preprocess" in server_log  # verbose: the requests are in the log
    client_text = caplog.text + capsys.readouterr().out + cli_ok.output + cli_bad.output
    assert "DICOM_FILES[2]" in client_text and "PatientID" in client_text  # the rejections were seen
    for where, text in (("server log", server_log), ("client output", client_text)):
        leaked = [s for s in SECRETS if s.lower() in text.lower()]
        assert not leaked, f"{where} contains {leaked}"
        dump = ARRAY_DUMP.search(text)
        assert dump is None, f"{where} contains an array dump: {text[max(0, dump.start() - 80): dump.end() + 80]!r}"
