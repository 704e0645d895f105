"""Send result objects (the SR and the presentation state) back to the PACS: DICOM C-STORE or STOW-RS.

Both senders have ``.send(datasets)``, which stores every dataset or raises:

* ``TransientSendError``: worth retrying later, the destination may accept the same objects then
  (connection refused or reset, timeouts, an association rejected as transient, C-STORE statuses
  0xA7xx "out of resources", HTTP 5xx, 408 and 429);
* ``PermanentSendError``: retrying will not help until someone changes a configuration (an
  association rejected as permanent, e.g. an unknown called AE title; no accepted presentation
  context for the object's SOP class; any other C-STORE failure status such as 0xA9xx "dataset
  does not match SOP class" or 0xCxxx "cannot understand"; HTTP 4xx; STOW-RS failure reasons
  other than 0xA7xx).

Messages name the destination, the SOP class and the status; never a patient identifier or UID.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass
from typing import Sequence

import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
)

log = logging.getLogger(__name__)

# the SOP classes the gateway sends; each is requested with Explicit and Implicit VR Little Endian
RESULT_SOP_CLASSES = (ComprehensiveSRStorage, Comprehensive3DSRStorage, GrayscaleSoftcopyPresentationStateStorage)
DEFAULT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
AE_TITLE_MAX = 16
SUCCESS = 0x0000
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}  # stored, with coercion or elements discarded (PS3.4 B.2.3)
DEFAULT_TIMEOUT_S = 30.0

# STOW-RS (PS3.18 10.5.3): HTTP statuses that a later attempt may turn into success
TRANSIENT_HTTP = {408, 429}
PERMANENT_5XX = {501, 505}  # not implemented, HTTP version not supported
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
REFERENCED_SOP_SEQUENCE = "00081199"
WARNING_REASON = "00081196"


class SendError(RuntimeError):
    """Sending results failed; ``destination`` is the AE address or URL, ``status`` the DICOM or HTTP status."""

    def __init__(self, message: str, destination: str, status: int | None = None) -> None:
        super().__init__(message)
        self.destination = destination
        self.status = status


class TransientSendError(SendError):
    """The destination may accept the same objects on a later attempt."""


class PermanentSendError(SendError):
    """The destination refuses; a retry fails the same way until the configuration changes."""


@dataclass(frozen=True)
class Destination:
    """A DICOM node: called AE title, host, port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(value: str, what: str = "AE title") -> str:
    """``value`` stripped of spaces if it is a valid AE title (1-16 ASCII characters, no backslash or control
    characters, not all spaces), else ValueError saying why."""
    stripped = value.strip()
    if not stripped:
        raise ValueError(f"{what} {value!r} is empty; give 1 to {AE_TITLE_MAX} ASCII characters")
    if len(stripped) > AE_TITLE_MAX:
        raise ValueError(f"{what} {value!r} has {len(stripped)} characters; at most {AE_TITLE_MAX} are allowed")
    if not stripped.isascii() or "\\" in stripped or any(not c.isprintable() for c in stripped):
        raise ValueError(f"{what} {value!r} may use printable ASCII characters only, without backslash")
    return stripped


def parse_destination(text: str) -> Destination:
    """``AET@HOST:PORT`` (e.g. ``PACS@10.0.0.5:104``; an IPv6 host in brackets) as a Destination, else ValueError."""
    example = "expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104"
    ae_title, at, address = text.rpartition("@")
    if not at:
        raise ValueError(f"destination {text!r} has no '@'; {example}")
    host, colon, port_text = address.rpartition(":")
    if not colon or not host:
        raise ValueError(f"destination {text!r} has no HOST:PORT after '@'; {example}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"destination {text!r}: port {port_text!r} is not a number; {example}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"destination {text!r}: port {port} is outside 1-65535")
    return Destination(check_ae_title(ae_title, f"called AE title in destination {text!r}"), host, port)


def sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


def cstore_status_error(status: int, destination: str, sop_class: str) -> SendError | None:
    """None for success and warnings; else the error for C-STORE response ``status`` (PS3.4 Annex B, PS3.7 C)."""
    if status == SUCCESS or status in WARNING_STATUSES:
        return None
    kind = TransientSendError if status & 0xFF00 == 0xA700 else PermanentSendError
    meaning = {0xA7: "out of resources", 0xA9: "dataset does not match SOP class", 0xC0: "cannot understand"}.get(
        status >> 8, {0x0122: "SOP class not supported", 0x0124: "not authorized", 0x0110: "processing failure",
                      0x0211: "unrecognized operation", 0x0117: "invalid SOP instance"}.get(status, "failure"))
    action = "retrying later" if kind is TransientSendError else "check that the destination accepts this object"
    return kind(f"C-STORE of {sop_class_name(sop_class)} to {destination} failed with status 0x{status:04X} ({meaning}); {action}",
                destination, status)


def http_status_error(status: int, destination: str, detail: str = "") -> SendError | None:
    """None for 200; else the error for STOW-RS answer ``status`` (PS3.18 10.5.3)."""
    if status == 200:
        return None
    suffix = f": {detail}" if detail else ""
    if status >= 500 and status not in PERMANENT_5XX or status in TRANSIENT_HTTP:
        return TransientSendError(f"STOW-RS to {destination} answered HTTP {status}; retrying later{suffix}", destination, status)
    return PermanentSendError(f"STOW-RS to {destination} answered HTTP {status}; the server refuses these objects{suffix}",
                              destination, status)


def part10(ds: Dataset) -> bytes:
    """``ds`` as DICOM Part 10 bytes; file meta filled from the dataset where missing (Explicit VR Little Endian)."""
    meta = ds.file_meta if getattr(ds, "file_meta", None) is not None else FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class CStoreSender:
    """C-STORE SCU: one association per ``send``, to ``send_to`` (``AET@HOST:PORT``) as ``calling_ae``."""

    def __init__(self, send_to: str, calling_ae: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.destination = parse_destination(send_to)
        self.calling_ae = check_ae_title(calling_ae, "calling AE title")
        self.timeout_s = timeout_s

    def _ae(self, datasets: Sequence[Dataset]):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        sop_classes = dict.fromkeys([*(ds.SOPClassUID for ds in datasets), *RESULT_SOP_CLASSES])
        for sop_class in sop_classes:
            syntaxes = dict.fromkeys([*(ds.file_meta.TransferSyntaxUID for ds in datasets if ds.SOPClassUID == sop_class
                                        and "TransferSyntaxUID" in getattr(ds, "file_meta", ())),
                                      *DEFAULT_TRANSFER_SYNTAXES])
            ae.add_requested_context(sop_class, list(syntaxes))
        return ae

    def send(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            return
        where = str(self.destination)
        assoc = self._ae(datasets).associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            kind = TransientSendError if rsp.result == 0x02 else PermanentSendError
            raise kind(f"{where} rejected the association from {self.calling_ae} ({rsp.result_str}, {rsp.source_str}: "
                       f"{rsp.reason_str}); check the called AE title and that the PACS knows the calling AE title", where)
        if not assoc.is_established:
            if assoc.accepted_contexts == [] and assoc.rejected_contexts:
                raise PermanentSendError(f"{where} accepted none of the proposed SOP classes "
                                         f"({', '.join(sorted({sop_class_name(cx.abstract_syntax) for cx in assoc.rejected_contexts}))})",
                                         where)
            raise TransientSendError(f"no association with {where} (connection refused or reset, or no answer within "
                                     f"{self.timeout_s:g} s); retrying later", where)
        try:
            for ds in datasets:
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as e:  # no accepted presentation context for this SOP class / transfer syntax
                    raise PermanentSendError(f"{where} did not accept {sop_class_name(ds.SOPClassUID)}: {e}", where) from None
                except (OSError, RuntimeError) as e:
                    raise TransientSendError(f"C-STORE to {where} failed: {e}; retrying later", where) from e
                if "Status" not in status:
                    raise TransientSendError(f"C-STORE of {sop_class_name(ds.SOPClassUID)} to {where} got no response "
                                             f"(association aborted or no answer within {self.timeout_s:g} s); retrying later", where)
                error = cstore_status_error(int(status.Status), where, ds.SOPClassUID)
                if error is not None:
                    raise error
                if status.Status != SUCCESS:
                    log.warning("C-STORE of %s to %s: warning status 0x%04X", sop_class_name(ds.SOPClassUID), where, status.Status)
        finally:
            if assoc.is_established:
                assoc.release()


class StowSender:
    """STOW-RS: POST ``{url}/studies`` with every dataset in one multipart/related request.

    ``url`` is the DICOMweb root (e.g. ``http://pacs:8042/dicom-web``). ``session`` carries
    authentication or TLS settings where the server needs them.
    """

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, session: requests.Session | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"STOW-RS URL {url!r} must start with http:// or https://, e.g. http://pacs:8042/dicom-web")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def send(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            return
        where = f"{self.url}/studies"
        boundary = uuid.uuid4().hex
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), part10(ds)) for ds in datasets)
        body += b"--%s--\r\n" % boundary.encode()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        try:
            response = self.session.post(where, data=body, headers=headers, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TransientSendError(f"STOW-RS to {where} failed: {type(e).__name__} (no answer within "
                                     f"{self.timeout_s:g} s or connection refused); retrying later", where) from e
        failures = failure_reasons(response)
        if response.status_code in (200, 202, 409) and failures:
            transient = all(reason & 0xFF00 == 0xA700 for reason in failures)
            kind = TransientSendError if transient else PermanentSendError
            codes = ", ".join(f"0x{reason:04X}" for reason in failures)
            raise kind(f"STOW-RS to {where}: {len(failures)} of {len(datasets)} objects failed (failure reasons {codes})",
                       where, response.status_code)
        error = http_status_error(200 if response.status_code == 202 else response.status_code, where, response.reason or "")
        if error is not None:
            raise error


def failure_reasons(response: requests.Response) -> list[int]:
    """The FailureReason (0008,1197) of each item of FailedSOPSequence in a STOW-RS JSON answer (PS3.18 10.5.3.1)."""
    if "json" not in response.headers.get("Content-Type", ""):
        return []
    try:
        answer = response.json()
    except ValueError:
        return []
    if isinstance(answer, list):
        answer = answer[0] if answer else {}
    items = (answer.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    reasons = []
    for item in items:
        values = (item.get(FAILURE_REASON) or {}).get("Value") or [0xC000]
        reasons.append(int(values[0]))
    return reasons
