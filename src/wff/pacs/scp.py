"""The C-STORE SCP of ``wff pacs listen`` (pynetdicom), feeding a :class:`~wff.pacs.gateway.Gateway`.

* Presentation contexts: MR Image Storage and Enhanced MR Image Storage (in the transfer
  syntaxes the ensemble decodes), and Verification (C-ECHO). Any other SOP class is rejected
  at association negotiation, so results the PACS holds (SR, presentation states) never arrive.
* The called AE title must be the gateway's own; with ``allow`` set, only those calling AE
  titles are accepted (A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not
  recognised).
* Above the disk watermark (too little free disk, or the spool over its maximum) a new
  association is rejected (rejected-transient, service-provider presentation-related,
  temporary congestion) and a C-STORE answered 0xA700 "out of resources".
* An instance is committed before its C-STORE is answered: its file is in the study's spool and
  the study's state on disk (each fsynced) when the SCP answers 0x0000 Success, so a crash or an
  abort after the answer loses nothing the sender was told is stored. When the write fails the
  answer is 0xA700 (out of resources: disk full, or another OS error), so the sender keeps the
  instance and may send it again. An aborted or dropped association keeps every instance
  answered with Success.
* A study that an open association has delivered instances to is not quiet (its quiet time
  counts from its last instance and it waits for the association's end); ``--max-wait`` still
  applies. At the association's end (EVT_RELEASED, EVT_ABORTED or EVT_CONN_CLOSE) the audit log
  gets one ``received`` line per study and one ``association`` or ``association-dropped`` line
  with the counts.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from wff.ensemble import dicom_guard
from wff.pacs.gateway import CHANGED, DUPLICATE, NEW, Gateway, ignore_reason, read_header

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
# transfer syntaxes accepted for MR instances: the native ones and the compressions the ensemble decodes
TRANSFER_SYNTAXES = [dicom_guard.EXPLICIT_LE, dicom_guard.IMPLICIT_LE, dicom_guard.DEFLATED, dicom_guard.EXPLICIT_BE,
                     *dicom_guard.JPEG_SYNTAXES, *dicom_guard.J2K_SYNTAXES, dicom_guard.RLE_SYNTAX]
SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_BUSY = (0x02, 0x03, 0x01)  # rejected-transient, service-provider (presentation), temporary congestion
REJECT_REASONS = {  # (source, diagnostic) -> reason label in the audit log and metrics
    (0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x07): "called AE title not recognised",
    (0x03, 0x02): "association limit",
    (0x03, 0x01): "disk watermark",
}


@dataclass
class _Association:
    calling_ae: str
    started: float = field(default_factory=time.monotonic)
    studies: dict[str, Counter] = field(default_factory=dict)  # StudyInstanceUID -> outcomes (NEW, CHANGED, DUPLICATE)
    ignored: int = 0  # answered Success, not input (the gateway's own objects)
    refused: int = 0  # answered with a failure status
    done: bool = False  # ended: a C-STORE still in hand is refused, not counted
    lock: threading.Lock = field(default_factory=threading.Lock)  # one C-STORE or the end at a time


class StoreSCP:
    """``start()`` listens on (settings.host, settings.port) in pynetdicom's server thread; ``stop()`` ends it and aborts
    the associations in progress."""

    def __init__(self, gateway: Gateway) -> None:
        from pynetdicom import AE, evt

        self.gateway = gateway
        settings = gateway.settings
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = list(settings.allow)
        for sop_class in (MRImageStorage, EnhancedMRImageStorage):
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(VERIFICATION)
        self._associations: dict[object, _Association] = {}
        self._lock = threading.Lock()
        self._server = None
        self.handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_dropped),
            (evt.EVT_CONN_CLOSE, self._on_dropped),
        ]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        settings = self.gateway.settings
        try:
            self._server = self.ae.start_server((settings.host, settings.port), block=False, evt_handlers=self.handlers)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"port {settings.port} on {settings.host} is in use by another program; choose another "
                                       f"--port, or stop the program that holds it (ss -ltnp 'sport = :{settings.port}')") from e
            if e.errno == errno.EACCES:
                raise OSError(e.errno, f"no permission to listen on port {settings.port}: ports below 1024 need privileges; "
                                       "use a port of 1024 or above (DICOM's registered port is 11112)") from e
            raise OSError(e.errno, f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}; check --host and --port") from e

    def stop(self) -> None:
        if self._server is not None:
            self.ae.shutdown()  # the server, and an abort to every association in progress (what they delivered is kept)
            self._server = None

    # association events
    def _on_requested(self, event) -> None:
        why = self.gateway.over_watermark()
        if why is None:
            return
        log.warning("refusing an association from %s: %s", event.assoc.requestor.ae_title, why)
        event.assoc.acse.send_reject(*REJECT_BUSY)
        self._rejected(event.assoc, REJECT_BUSY[1:])
        event.assoc.kill()  # as pynetdicom does after its own rejections: the DUL stops once the peer closes (or ARTIM expires)

    def _on_rejected(self, event) -> None:
        rsp = event.assoc.acceptor.primitive
        self._rejected(event.assoc, (rsp.result_source, rsp.diagnostic))

    def _rejected(self, assoc, source_diagnostic: tuple[int, int]) -> None:
        reason = REJECT_REASONS.get(tuple(source_diagnostic), "rejected")
        self.gateway.metrics.inc("wff_pacs_associations_rejected_total", reason=reason)
        self.gateway.audit.event("association-rejected", calling_ae=assoc.requestor.ae_title, reason=reason)

    def _on_established(self, event) -> None:
        with self._lock:
            self._associations[event.assoc] = _Association(event.assoc.requestor.ae_title)

    def _on_store(self, event) -> int:
        with self._lock:
            pending = self._associations.get(event.assoc)
        if pending is None:
            return CANNOT_UNDERSTAND
        with pending.lock:
            status = self._store(event, pending)
            if status != SUCCESS:
                pending.refused += 1
            return status

    def _store(self, event, pending: _Association) -> int:
        """Checks and commits one C-STORE's instance; its response status."""
        if pending.done:  # the connection closed while this request waited: the answer cannot reach the sender
            return OUT_OF_RESOURCES
        why = self.gateway.over_watermark()
        if why is not None:
            log.warning("C-STORE from %s refused: %s", pending.calling_ae, why)
            return OUT_OF_RESOURCES
        data = event.encoded_dataset()
        try:
            header = read_header(data)
        except ValueError as e:
            log.warning("C-STORE from %s refused: %s", pending.calling_ae, e)
            return DOES_NOT_MATCH
        if header.sop_class != event.request.AffectedSOPClassUID:
            return DOES_NOT_MATCH
        reason = ignore_reason(header, self.gateway.settings.uid_root)
        if reason is not None:  # the gateway's own object under an MR SOP class: answered, never taken
            pending.ignored += 1
            self.gateway.metrics.inc("wff_pacs_instances_ignored_total", reason=reason.removeprefix("ignored: "))
            return SUCCESS
        if header.study_uid not in pending.studies:
            self.gateway.hold(header.study_uid)  # before the first instance is visible to the worker
            pending.studies[header.study_uid] = Counter()
        try:
            outcome = self.gateway.commit_instance(header, data)
        except OSError as e:
            log.error("C-STORE from %s refused: the instance cannot be written to the state folder %s: %s",
                      pending.calling_ae, self.gateway.settings.state_dir, e.strerror or e)
            return OUT_OF_RESOURCES
        pending.studies[header.study_uid][outcome] += 1
        return SUCCESS

    def _on_released(self, event) -> None:
        self._end(event.assoc, "association")

    def _on_dropped(self, event) -> None:
        self._end(event.assoc, "association-dropped")

    def _end(self, assoc, audit_event: str) -> None:
        """The association ended: its studies may go quiet; one ``received`` line per study, one line for it."""
        with self._lock:
            pending = self._associations.pop(assoc, None)
        if pending is None:
            return
        with pending.lock:
            pending.done = True
        self.gateway.unhold(pending.studies)
        self.gateway.record_received({uid: n for uid, n in pending.studies.items() if n}, pending.calling_ae, source="dimse")
        totals = sum(pending.studies.values(), Counter())
        self.gateway.audit.event(audit_event, calling_ae=pending.calling_ae, instances=totals.total(),
                                 kept=totals[NEW] + totals[CHANGED], duplicates=totals[DUPLICATE], ignored=pending.ignored,
                                 refused=pending.refused, duration_s=round(time.monotonic() - pending.started, 3))
