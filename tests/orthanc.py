"""A real Orthanc (the Debian package's /usr/sbin/Orthanc) standing in for the hospital's PACS.

``Orthanc(folder)`` writes a JSON configuration into ``folder`` (free loopback ports for DICOM
and HTTP, storage and index in ``folder``, the DICOMweb plugin at ``/dicom-web``, no remote
access and no authentication on loopback, called-AE check on, an optional Lua script), starts
the server, waits until ``GET /system`` answers and stops it on exit (SIGTERM, then SIGKILL,
the first taking Orthanc about 3.5 s). Its log is
``folder/orthanc.log``; a failed start raises with the log's tail.

The ``orthanc`` fixture is one server per test module: import it into a test module
(``from orthanc import orthanc``) to use it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import requests

from wff.processes import free_port, stop_process_group

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AE_TITLE = "ORTHANC"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 4000


class Orthanc:
    """One Orthanc process on 127.0.0.1. ``modalities`` maps a name to (AE title, port) of peers on loopback."""

    def __init__(self, folder: Path, *, ae_title: str = AE_TITLE, modalities: dict[str, tuple[str, int]] | None = None,
                 stable_age_s: int = 2, lua: str | None = None) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = self.folder / "orthanc.log"
        self.config = {
            "Name": "wff-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,  # an unknown called AE title is rejected (the senders' permanent errors)
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in (modalities or {}).items()},
            "DicomAssociationCloseDelay": 0,  # release the SCU association right after a REST store
            "DicomScuTimeout": 10,
            "StableAge": stable_age_s,
            "SaveJobs": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1", "Ssl": False},
        }
        self.lua = lua  # a Lua script Orthanc runs (e.g. an auto-routing rule), written to folder/rules.lua
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def address(self) -> str:
        """The DICOM node as ``AET@HOST:PORT`` (the gateway's --send-to)."""
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        if self.lua is not None:
            (self.folder / "rules.lua").write_text(self.lua)
            self.config["LuaScripts"] = [str(self.folder / "rules.lua")]
        config_path.write_text(json.dumps(self.config, indent=2))
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([ORTHANC, "--verbose", str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.process.returncode} at start-up; its log:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    self.start_seconds = time.monotonic() - started
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer GET /system within {START_TIMEOUT_S:.0f} s; its log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, STOP_TIMEOUT_S)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(no log at {self.log_path}: {e})"

    # REST API (https://orthanc.uclouvain.be/book/users/rest.html)

    def get(self, path: str, **params):
        response = requests.get(f"{self.url}{path}", params=params, timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body=None, *, data: bytes | None = None):
        response = requests.post(f"{self.url}{path}", json=body, data=data, timeout=REQUEST_TIMEOUT_S)
        if not response.ok:
            raise RuntimeError(f"Orthanc POST {path}: HTTP {response.status_code} {response.text[:500]}")
        return response.json()

    def upload(self, data: bytes) -> dict:
        """POST /instances with one DICOM Part 10 file; Orthanc's answer (ID, ParentStudy, Status ...)."""
        return self.post("/instances", data=data)

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        response = requests.put(f"{self.url}/modalities/{name}", json={"AET": ae_title, "Host": host, "Port": port},
                                timeout=REQUEST_TIMEOUT_S)
        if not response.ok:
            raise RuntimeError(f"Orthanc PUT /modalities/{name}: HTTP {response.status_code} {response.text[:500]}")

    def send_to_modality(self, name: str, resources: list[str]) -> dict:
        """C-STORE Orthanc resources (its IDs of studies, series or instances) to a modality, waiting for the job."""
        return self.post(f"/modalities/{name}/store", {"Resources": resources, "Synchronous": True})

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's ID of a study by its StudyInstanceUID, None when it holds no such study."""
        found = self.post("/tools/lookup", data=study_uid.encode())
        return next((item["ID"] for item in found if item["Type"] == "Study"), None)

    def instance_ids(self) -> list[str]:
        return self.get("/instances")

    def clear(self) -> None:
        """Delete every study."""
        for study in self.get("/studies"):
            requests.delete(f"{self.url}/studies/{study}", timeout=REQUEST_TIMEOUT_S).raise_for_status()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, request):
    """One Orthanc for a test module; its log goes to the terminal when a test of the module failed."""
    failed_before = request.session.testsfailed
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
    if request.session.testsfailed > failed_before:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n--- Orthanc log ({server.log_path}), last {LOG_TAIL_CHARS} characters ---\n{server.log_tail()}")
