"""Pull MR studies from a DICOMweb server: QIDO-RS to find new ones, WADO-RS to fetch their instances.

``DicomwebSource(url).new_studies()`` lists the StudyInstanceUIDs of MR studies (QIDO-RS
``ModalitiesInStudy=MR``) that were not taken yet, or that hold more or fewer MR instances than
when they were last taken (late instances: the gateway diagnoses them as a new result version).
Instances of other modalities (the gateway's own SR and presentation state among them) do not
make a study new. ``retrieve(study_uid)`` fetches the study's MR series (WADO-RS, in the stored
transfer syntax where the server allows it) and returns ``(name, Part 10 bytes)`` for each MR
Image Storage / Enhanced MR Image Storage instance; it records the study as taken.

``since`` limits the listing to studies whose StudyDate is on or after a date (QIDO-RS range
matching ``StudyDate=YYYYMMDD-``): ``YYYYMMDD``, or ``Nd`` for the date N days before today (local
date, worked out again at each listing, so the window moves with the calendar). A study without
StudyDate does not match a range, so it is not listed then.

What was taken is kept in ``state_file`` (JSON, keyed by a hash of the StudyInstanceUID, written
atomically) when one is given, so a restarted watcher does not fetch everything again; else in
the object.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import pydicom
import requests
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

log = logging.getLogger(__name__)

MR_SOP_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage})
STUDY_INSTANCE_UID = "0020000D"
SERIES_INSTANCE_UID = "0020000E"
STUDY_INSTANCES = "00201208"  # Number of Study Related Instances
SERIES_INSTANCES = "00201209"  # Number of Series Related Instances
PAGE_SIZE = 500  # QIDO-RS results per request (limit/offset paging)
DEFAULT_TIMEOUT_S = 60.0
ACCEPT_STORED_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT_SYNTAX = 'multipart/related; type="application/dicom"'
STATE_FORMAT = 1
SINCE_FORMS = "a date YYYYMMDD (e.g. 20240101) or a number of days Nd (e.g. 7d; 0d: today)"


def parse_since(text: str) -> dt.date | int:
    """``--since``: a date (YYYYMMDD) or a number of days before today (``Nd``); ValueError naming the forms."""
    value = text.strip()
    days = re.fullmatch(r"(\d{1,5})d", value, flags=re.IGNORECASE)
    if days:
        return int(days.group(1))
    if re.fullmatch(r"\d{8}", value):
        try:
            return dt.datetime.strptime(value, "%Y%m%d").date()
        except ValueError:
            raise ValueError(f"--since {text!r} is not a calendar date; give {SINCE_FORMS}") from None
    hint = " (StudyDate has no time of day: give days)" if re.fullmatch(r"\d+\s*h", value, flags=re.IGNORECASE) else ""
    raise ValueError(f"--since {text!r}: give {SINCE_FORMS}{hint}")


class DicomwebError(RuntimeError):
    """A DICOMweb request failed: the message names the URL and the HTTP status or network error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def study_hash(study_uid: str) -> str:
    return hashlib.sha256(study_uid.encode()).hexdigest()[:32]


def redact(path: str) -> str:
    """``path`` with its UIDs replaced by ``...`` (for messages)."""
    return "/".join("..." if part and part.replace(".", "").isdigit() else part for part in path.split("/"))


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2046), given its Content-Type header."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ValueError(f"multipart answer without a boundary (Content-Type {content_type!r})")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a header/body separator")
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


class DicomwebSource:
    """MR studies of the DICOMweb server at ``url`` (its root, e.g. ``http://pacs:8042/dicom-web``).

    ``session`` carries authentication or TLS settings where the server needs them. ``since``: see the
    module's text; ``today`` gives the local date it counts back from.
    """

    def __init__(self, url: str, *, state_file: str | Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 session: requests.Session | None = None, since: str | None = None,
                 today: Callable[[], dt.date] = dt.date.today) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"DICOMweb URL {url!r} must start with http:// or https://, e.g. http://pacs:8042/dicom-web")
        self.since = parse_since(since) if since is not None else None
        self.today = today
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.state_file = Path(state_file) if state_file is not None else None
        # study hash -> {"total": instances of any modality at the last listing, "mr": MR instances taken}
        self.taken: dict[str, dict] = self._load()
        self._listed_totals: dict[str, int | None] = {}

    def _load(self) -> dict[str, dict]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            data = json.loads(self.state_file.read_text())
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {STATE_FORMAT}")
            return dict(data["studies"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.state_file}: not a DICOMweb watch state ({e}); move it away to fetch every study again") from e

    def _save(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": STATE_FORMAT, "studies": self.taken}, sort_keys=True))
        os.replace(tmp, self.state_file)

    def _get(self, path: str, params: dict | None = None, accept: str = "application/dicom+json") -> requests.Response:
        url = f"{self.url}{path}"
        try:
            response = self.session.get(url, params=params, headers={"Accept": accept}, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise DicomwebError(f"DICOMweb request to {self.url} failed: {type(e).__name__} (connection refused or no "
                                f"answer within {self.timeout_s:g} s)") from e
        return response

    def _json(self, path: str, params: dict) -> list[dict]:
        response = self._get(path, params)
        if response.status_code == 204:
            return []
        if not response.ok:
            raise DicomwebError(f"QIDO-RS {self.url}{redact(path)} answered HTTP {response.status_code} {response.reason}",
                                response.status_code)
        return response.json() if response.content else []

    def _mr_series(self, study_uid: str) -> list[tuple[str, int | None]]:
        """(SeriesInstanceUID, number of instances or None) of the study's MR series."""
        found = self._json(f"/studies/{study_uid}/series", {"Modality": "MR", "includefield": SERIES_INSTANCES})
        return [(_value(item, SERIES_INSTANCE_UID), _value(item, SERIES_INSTANCES)) for item in found
                if _value(item, SERIES_INSTANCE_UID)]

    def _mr_count(self, study_uid: str, series: list[tuple[str, int | None]]) -> int:
        """The study's number of MR instances: from the series counts, else by listing its MR instances."""
        if all(n is not None for _, n in series):
            return sum(int(n) for _, n in series)
        return len(self._json(f"/studies/{study_uid}/instances", {"Modality": "MR"}))

    def since_date(self) -> str | None:
        """The first StudyDate listed (DICOM DA, YYYYMMDD), None without ``since``."""
        if self.since is None:
            return None
        first = self.since if isinstance(self.since, dt.date) else self.today() - dt.timedelta(days=self.since)
        return first.strftime("%Y%m%d")

    def new_studies(self) -> list[str]:
        """StudyInstanceUIDs of the MR studies not taken yet or whose MR instances changed in number since."""
        listed: dict[str, tuple[str, int | None]] = {}
        query = {"ModalitiesInStudy": "MR", "includefield": STUDY_INSTANCES}
        if self.since is not None:
            query["StudyDate"] = f"{self.since_date()}-"
        offset = 0
        while True:
            page = self._json("/studies", {**query, "limit": PAGE_SIZE, "offset": offset})
            for item in page:
                uid = _value(item, STUDY_INSTANCE_UID)
                if uid:
                    total = _value(item, STUDY_INSTANCES)
                    listed[study_hash(uid)] = (uid, int(total) if total is not None else None)
            if len(page) < PAGE_SIZE:
                break
            offset += PAGE_SIZE
        changed = False
        for key in set(self.taken) - set(listed):  # gone from the server
            del self.taken[key]
            changed = True
        new = []
        for key, (uid, total) in listed.items():
            memory = self.taken.get(key)
            self._listed_totals[key] = total
            if memory is not None and total is not None and memory.get("total") == total:
                continue
            if memory is not None:
                mr = self._mr_count(uid, self._mr_series(uid))
                if mr == memory.get("mr"):  # only other modalities came (e.g. our SR): not new
                    memory["total"] = total
                    changed = True
                    continue
            new.append(uid)
        if changed:
            self._save()
        return new

    def retrieve(self, study_uid: str) -> list[tuple[str, bytes]]:
        """``(name, Part 10 bytes)`` of each MR instance of the study; records the study as taken."""
        files, series = [], self._mr_series(study_uid)
        for series_uid, _ in series:
            for data in self._series_instances(study_uid, series_uid):
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
                sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
                if sop_class not in MR_SOP_CLASSES:
                    continue
                sop_uid = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID", "")
                files.append((f"{hashlib.sha256(str(sop_uid).encode()).hexdigest()[:24]}.dcm", data))
        key = study_hash(study_uid)
        self.taken[key] = {"total": self._listed_totals.get(key), "mr": self._mr_count(study_uid, series)}
        self._save()
        return files

    def _series_instances(self, study_uid: str, series_uid: str) -> list[bytes]:
        path = f"/studies/{study_uid}/series/{series_uid}"
        response = self._get(path, accept=ACCEPT_STORED_SYNTAX)
        if response.status_code in (400, 406):  # the server cannot send the stored transfer syntax as asked
            response = self._get(path, accept=ACCEPT_DEFAULT_SYNTAX)
        if not response.ok:
            raise DicomwebError(f"WADO-RS {self.url}{redact(path)} answered HTTP {response.status_code} {response.reason}",
                                response.status_code)
        try:
            return multipart_parts(response.headers.get("Content-Type", ""), response.content)
        except ValueError as e:
            raise DicomwebError(f"WADO-RS {self.url}: {e}") from e
