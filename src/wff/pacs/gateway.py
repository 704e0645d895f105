"""The gateway's work: take instances in, decide when a study is complete, diagnose it, send the results.

    gateway = Gateway(settings, sender, diagnose=client.diagnose)
    gateway.recover()                          # at start-up: finish what a crash left
    gateway.add_instances([(None, name, data)], "MODALITY")  # a batch (the DICOMweb watcher)
    gateway.commit_instance(header, data)      # one instance on disk before its C-STORE is answered (the SCP)
    gateway.poll()                             # diagnose / send whatever is due

Input: only MR Image Storage and Enhanced MR Image Storage instances whose UIDs are not under
the gateway's own UID root, so a result the gateway stored (SR, presentation state) never
starts another diagnosis. A SOP Instance UID sent again with the same content changes nothing;
with other content, or a new instance, the study waits for completeness again and its next
diagnosis is a new result version.

Completeness: a study is due once no instance arrived for ``quiet_seconds`` and no association
that delivered instances of it is still open (``hold`` / ``unhold``), or ``max_wait_s`` after its
first pending instance. Each stage (diagnose, send) of a study is retried on a
transient failure (server unavailable, out-of-resources, connection refused) after a pause that
doubles up to ``retry_max_s``; after ``max_attempts`` failed attempts, or at once on a permanent
failure (input rejected by the server, association or object refused by the PACS), the study is
a dead letter: recorded in its state and in the audit log, and left until an instance of it
changes or ``retry_dead_letters`` is called.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from wff.pacs.age import HEADER_ERRORS, files_age
from wff.pacs.audit import AuditLog, load_salt
from wff.pacs.metrics import Metrics
from wff.pacs.settings import GatewaySettings
from wff.pacs.store import DEAD_LETTER, DIAGNOSED, MIB, RECEIVED, STORED, Spool, StudyState, content_hash
from wff.pacs.uids import is_own_uid

log = logging.getLogger(__name__)

INPUT_SOP_CLASSES = (MRImageStorage, EnhancedMRImageStorage)
HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
# outcomes of add_instance
NEW, CHANGED, DUPLICATE = "new", "changed", "duplicate"
NOT_MR, OWN_OBJECT, UNREADABLE = "ignored: not an MR image", "ignored: made by the gateway", "ignored: unreadable"
ERROR_TEXT_MAX = 500  # characters of a failure message kept in a study's state

Diagnose = Callable[[Sequence[tuple[str, bytes]], "float | None"], object]
MakeResults = Callable[..., list[Dataset]]


@dataclass(frozen=True)
class Header:
    """What the gateway reads of an instance before keeping it."""

    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str


def read_header(data: bytes) -> Header:
    """The UIDs of a DICOM Part 10 file; ValueError when it is not one or lacks SOP Instance or Study UID."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except HEADER_ERRORS as e:
        raise ValueError(f"not a readable DICOM file ({type(e).__name__})") from e
    values = {tag: str(ds.get(tag, "") or "").strip() for tag in HEADER_TAGS}
    if not values["SOPClassUID"]:
        values["SOPClassUID"] = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    missing = [tag for tag in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID") if not values[tag]]
    if missing:
        raise ValueError(f"the file has no {', '.join(missing)}")
    return Header(values["SOPClassUID"], values["SOPInstanceUID"], values["StudyInstanceUID"], values["SeriesInstanceUID"])


def ignore_reason(header: Header, uid_root: str) -> str | None:
    """Why an instance is not input (not MR, or the gateway's own object), None when it is."""
    if header.sop_class not in INPUT_SOP_CLASSES:
        return NOT_MR
    if any(is_own_uid(uid, uid_root) for uid in (header.sop_uid, header.series_uid)):
        return OWN_OBJECT
    return None


def failure_kind(error: Exception) -> tuple[bool, str]:
    """(transient, coarse reason) of a failed diagnosis or send; reasons carry no identifiers."""
    from wff.client.grpc_client import BackendDown, DiagnosisError, RejectedInput, RequestTooLarge, ServerUnavailable
    from wff.pacs.send import PermanentSendError, TransientSendError
    from wff.serving.custom_metrics import rejection_reason

    if isinstance(error, RejectedInput):
        return False, f"rejected input: {rejection_reason(str(error))}"
    if isinstance(error, RequestTooLarge):
        return False, "study too large to send"
    if isinstance(error, (ServerUnavailable, BackendDown)):
        return True, error.reason
    if isinstance(error, DiagnosisError):
        return True, f"server error {error.status or ''}".strip()
    if isinstance(error, TransientSendError):
        return True, "destination unavailable"
    if isinstance(error, PermanentSendError):
        return False, "destination refused"
    return False, type(error).__name__


def _short(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= ERROR_TEXT_MAX else text[: ERROR_TEXT_MAX - 3] + "..."


class Gateway:
    """Studies in the spool and their state; ``add_instance`` from receiving threads, ``poll`` from one worker.

    ``sender``: ``.send(datasets)`` raising wff.pacs.send's TransientSendError / PermanentSendError.
    ``diagnose``: ``(files as (name, bytes), age in years or None) -> Diagnosis``; default a
    DiagnosisClient on ``settings.url``. ``make_results``: ``(datasets, diagnosis, settings=...)
    -> [datasets]``; default wff.pacs.results.make_results. ``clock``: seconds since the epoch
    (states keep wall-clock times, so due times survive a restart).
    """

    def __init__(self, settings: GatewaySettings, sender, *, diagnose: Diagnose | None = None, make_results: MakeResults | None = None,
                 audit: AuditLog | None = None, metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.sender = sender
        self.spool = Spool(settings.state_dir)
        try:
            self.audit = audit or AuditLog(settings.audit_path, load_salt(settings.state_dir))
        except OSError:
            self.spool.close()
            raise
        self.metrics = metrics or Metrics()
        self.clock = clock
        self._diagnose = diagnose
        self._make_results = make_results
        self._lock = threading.RLock()
        self._held: Counter = Counter()  # StudyInstanceUID -> open associations that delivered instances of it
        self._unsaved: set[str] = set()  # studies whose state change could not be written (saved again at the next instance)
        states, problems = self.spool.load()
        for problem in problems:
            log.warning("%s", problem)
        self.studies: dict[str, StudyState] = {s.study_uid: s for s in states}

    # start-up
    def recover(self) -> dict[str, int]:
        """Drops the temp files of writes a crash interrupted, and counts the studies it left unfinished
        (received: to diagnose; diagnosed: to send); ``poll`` finishes them. Returns studies per status."""
        unfinished = self.spool.drop_incoming()
        with self._lock:
            counts = Counter(s.status for s in self.studies.values())
        summary = {status: counts.get(status, 0) for status in (RECEIVED, DIAGNOSED, STORED, DEAD_LETTER)}
        self.audit.event("recovered", studies=summary, unfinished_writes=unfinished)
        return summary

    def retry_dead_letters(self) -> int:
        """Every dead letter gets a fresh set of attempts at the stage it failed in; returns how many."""
        with self._lock:
            letters = [s for s in self.studies.values() if s.status == DEAD_LETTER]
            for s in letters:
                stage = (s.dead_letter or {}).get("stage")
                s.status = DIAGNOSED if stage == "send" and s.results else RECEIVED
                s.attempts, s.next_attempt_at, s.dead_letter = 0, 0.0, None
                if s.status == RECEIVED:
                    s.pending_since = self.clock()
                self.spool.save(s)
                self.audit.event("retry", s.study_uid, stage=stage, attempt=0, after="dead letter released")
        return len(letters)

    # input
    def over_watermark(self) -> str | None:
        """Why no more data can be taken (too little free disk, spool too large), None when it can."""
        free, used = self.spool.free_bytes(), self.spool.size()
        if free < self.settings.min_free_mb * MIB:
            return (f"{free // MIB} MB free on the disk of {self.spool.root}, below --min-free-mb {self.settings.min_free_mb}; "
                    "free disk space or lower --min-free-mb")
        if self.settings.max_spool_mb and used > self.settings.max_spool_mb * MIB:
            return (f"the spool {self.spool.root} holds {used // MIB} MB, above --max-spool-mb {self.settings.max_spool_mb}; "
                    "wait until studies are stored and purged, or raise --max-spool-mb")
        return None

    def add_instance(self, study_uid: str | None, name: str, data: bytes, calling_ae: str | None, source: str = "dimse") -> str:
        """Takes one instance (Part 10 bytes); returns NEW, CHANGED, DUPLICATE or an ignore reason.

        ``study_uid`` may be None; the file's own StudyInstanceUID decides where it goes.
        ``name`` is the sender's name for the file, used in log messages only.
        """
        return self.add_instances([(study_uid, name, data)], calling_ae, source)[0]

    def add_instances(self, items: Iterable[tuple[str | None, str, bytes]], calling_ae: str | None,
                      source: str = "dimse") -> list[str]:
        """``add_instance`` for several instances, with one state write per study and one audit line per study."""
        outcomes, touched = [], set()
        per_study: dict[str, Counter] = {}
        ignored = Counter()
        now = self.clock()
        for study_uid, name, raw in items:
            try:
                header = read_header(raw)
            except ValueError as e:
                log.warning("instance %s not taken: %s", name, e)
                outcomes.append(UNREADABLE)
                ignored[UNREADABLE] += 1
                continue
            if study_uid and study_uid != header.study_uid:
                log.warning("instance %s: its StudyInstanceUID differs from the study it came with; filed under its own", name)
            reason = ignore_reason(header, self.settings.uid_root)
            if reason is not None:
                outcomes.append(reason)
                ignored[reason] += 1
                continue
            outcome = self._take(header, raw, now)
            outcomes.append(outcome)
            per_study.setdefault(header.study_uid, Counter())[outcome] += 1
            if self._needs_save(outcome, header.study_uid):
                touched.add(header.study_uid)
        with self._lock:
            for uid in touched:
                self._save(self.studies[uid])
        self.record_received(per_study, calling_ae, source, ignored)
        return outcomes

    def commit_instance(self, header: Header, data: bytes) -> str:
        """One input instance (``ignore_reason`` None) into its study: its file and the study's state are on disk
        when this returns. NEW, CHANGED or DUPLICATE; OSError when the disk fails (nothing is taken then).

        Nothing is audited or counted here: the caller reports its instances with ``record_received``.
        """
        with self._lock:
            outcome = self._take(header, data, self.clock())
            if self._needs_save(outcome, header.study_uid):
                self._save(self.studies[header.study_uid])
        return outcome

    def record_received(self, per_study: dict[str, Counter], calling_ae: str | None, source: str = "dimse",
                        ignored: Counter | None = None) -> None:
        """Metrics and one ``received`` audit line per study for instances taken: ``per_study`` maps a
        StudyInstanceUID to its outcome counts (NEW, CHANGED, DUPLICATE); ``ignored`` counts ignore reasons."""
        for uid, counts in per_study.items():
            kept = counts[NEW] + counts[CHANGED]
            if kept:
                self.metrics.inc("wff_pacs_instances_received_total", kept, source=source)
            with self._lock:
                held = len(self.studies[uid].instances) if uid in self.studies else 0
            self.audit.event("received", uid, source=source, calling_ae=calling_ae, new=counts[NEW], changed=counts[CHANGED],
                             duplicates=counts[DUPLICATE], instances=held)
        ignored = ignored or Counter()
        for reason, n in ignored.items():
            self.metrics.inc("wff_pacs_instances_ignored_total", n, reason=reason.removeprefix("ignored: "))
        if ignored:
            self.audit.event("ignored", source=source, calling_ae=calling_ae,
                             reasons={r.removeprefix("ignored: "): n for r, n in ignored.items()})

    def hold(self, study_uid: str) -> None:
        """An association delivers instances of the study: it is not quiet until ``unhold`` (max wait still applies)."""
        with self._lock:
            self._held[study_uid] += 1

    def unhold(self, study_uids: Iterable[str]) -> None:
        """The association that held the studies ended (released, aborted or dropped)."""
        with self._lock:
            for uid in study_uids:
                self._held[uid] -= 1
                if self._held[uid] <= 0:
                    del self._held[uid]

    def _needs_save(self, outcome: str, study_uid: str) -> bool:
        """Whether the study's state must be written after taking an instance: it changed, or an earlier write failed."""
        return outcome != DUPLICATE or study_uid in self._unsaved

    def _take(self, header: Header, data: bytes, now: float) -> str:
        with self._lock:
            state = self.studies.get(header.study_uid) or StudyState(header.study_uid)
            old = state.instances.get(header.sop_uid)
            if old is not None and old.sha256 == content_hash(data):
                return DUPLICATE
            instance = self.spool.put_instance(state, header.sop_uid, data)  # an OSError leaves the state as it was
            self.studies[header.study_uid] = state
            state.instances[header.sop_uid] = instance
            state.mark_changed(now)
            return NEW if old is None else CHANGED

    def _save(self, state: StudyState) -> None:
        """The study's state to disk; after an OSError it is marked unsaved, so its next instance (even a duplicate) saves it."""
        with self._lock:
            try:
                self.spool.save(state)
            except OSError:
                self._unsaved.add(state.study_uid)
                raise
            self._unsaved.discard(state.study_uid)

    # work
    def due(self, now: float | None = None) -> list[str]:
        """StudyInstanceUIDs with work to do now, the longest waiting first."""
        now = self.clock() if now is None else now
        quiet, max_wait = self.settings.quiet_seconds, self.settings.max_wait_s
        with self._lock:
            ready = [
                s for s in self.studies.values()
                if s.next_attempt_at <= now and (
                    s.status == DIAGNOSED
                    or s.status == RECEIVED and (now - s.last_received >= quiet and not self._held[s.study_uid]
                                                 or now - (s.pending_since or now) >= max_wait))
            ]
        return [s.study_uid for s in sorted(ready, key=lambda s: s.last_received)]

    def poll(self) -> int:
        """Diagnoses and sends every due study (one at a time), then purges old stored studies; returns the studies worked on."""
        uids = self.due()
        for uid in uids:
            with self._lock:
                status = self.studies[uid].status
            if status == RECEIVED:
                self._diagnose_study(uid)
            with self._lock:
                status = self.studies[uid].status
            if status == DIAGNOSED and self.studies[uid].next_attempt_at <= self.clock():
                self._send_study(uid)
        self.purge()
        return len(uids)

    def diagnose_files(self, files: Sequence[tuple[str, bytes]], age: float | None):
        if self._diagnose is None:
            from wff.client.grpc_client import DiagnosisClient

            client = DiagnosisClient(self.settings.url, **self.settings.client)
            self._diagnose = client.diagnose
        return self._diagnose(files, age)

    def make_results(self, datasets: list[Dataset], diagnosis) -> list[Dataset]:
        if self._make_results is None:
            from wff.pacs.results import make_results

            self._make_results = make_results
        return self._make_results(datasets, diagnosis, settings=self.settings.results)

    def _diagnose_study(self, uid: str) -> None:
        with self._lock:
            state = self.studies[uid]
            revision, names = state.revision, sorted(item.file for item in state.instances.values())
        files = self.spool.read_instances(uid, names)
        age, age_source = files_age(files)
        started = time.monotonic()
        stage = "diagnose"
        try:
            diagnosis = self.diagnose_files(files, age)
            stage = "results"
            results = self.make_results([pydicom.dcmread(io.BytesIO(data)) for _, data in files], diagnosis)
        except Exception as e:  # noqa: BLE001 - every failure is recorded: retried or dead-lettered, never dropped
            self._failed(uid, stage, e, revision=revision)
            return
        took = time.monotonic() - started
        summary = {"diagnosis": getattr(diagnosis, "label", None), "p_malignant": _rounded(getattr(diagnosis, "p_malignant", None)),
                   "age_source": age_source, "model_version": self._model_version()}
        with self._lock:
            state = self.studies[uid]
            if state.revision != revision:
                self.audit.event("superseded", uid, instances=len(names), duration_s=round(took, 3))
                return
            version = state.version + 1
            written = self.spool.write_results(state, version, results)
            state.mark_diagnosed(revision, written, summary)
            self.spool.drop_results(state, keep_version=version)
            self.spool.save(state)
        self.metrics.inc("wff_pacs_studies_diagnosed_total")
        self.audit.event("diagnosed", uid, version=version, instances=len(names), objects=len(results), duration_s=round(took, 3),
                         age_source=age_source, model_version=summary["model_version"])

    def _send_study(self, uid: str) -> None:
        with self._lock:
            state = self.studies[uid]
            version = state.version
            datasets = self.spool.read_results(state)
        started = time.monotonic()
        try:
            self.sender.send(datasets)
        except Exception as e:  # noqa: BLE001 - every failure is recorded: retried or dead-lettered, never dropped
            self._failed(uid, "send", e, version=version)
            return
        took = time.monotonic() - started
        now = self.clock()
        with self._lock:
            state = self.studies[uid]
            since_last = now - state.last_received
            if state.status == DIAGNOSED and state.version == version:
                state.mark_stored(now)
                self.spool.save(state)
        self.metrics.inc("wff_pacs_results_stored_total")
        self.audit.event("stored", uid, version=version, objects=len(datasets), duration_s=round(took, 3),
                         since_last_instance_s=round(since_last, 3), destination=type(self.sender).__name__,
                         model_version=self._model_version())

    def _failed(self, uid: str, stage: str, error: Exception, *, revision: int | None = None, version: int | None = None) -> None:
        """Records a failed attempt: a retry after the backoff pause, or a dead letter."""
        transient, reason = failure_kind(error)
        if not transient:
            log.warning("study %s: %s failed: %s", self.audit.study_ref(uid), stage, error)
        now = self.clock()
        with self._lock:
            state = self.studies[uid]
            if (revision is not None and state.revision != revision) or (version is not None and (state.version != version or state.status != DIAGNOSED)):
                return  # the study changed meanwhile; its new content is handled afresh
            attempt = state.attempts + 1
            if transient and attempt < self.settings.max_attempts:
                pause = self.settings.retry_pause(attempt)
                state.mark_failed(_short(error), now + pause)
                event = {"event": "retry", "pause_s": round(pause, 3)}
            else:
                state.mark_failed(_short(error), 0.0)
                state.mark_dead_letter(stage, reason, _short(error), now)
                event = {"event": "dead-letter"}
            self.spool.save(state)
        if event["event"] == "retry":
            self.metrics.inc("wff_pacs_retries_total", stage=stage)
        else:
            self.metrics.inc("wff_pacs_dead_letters_total", stage=stage)
        self.audit.event(event.pop("event"), uid, stage=stage, attempt=attempt, max_attempts=self.settings.max_attempts,
                         reason=reason, transient=transient, **event)

    def purge(self, now: float | None = None) -> int:
        """Removes stored studies untouched for ``keep_hours``; returns how many."""
        now = self.clock() if now is None else now
        limit = self.settings.keep_hours * 3600
        with self._lock:
            old = [s for s in self.studies.values() if s.status == STORED and now - max(s.stored_at or 0, s.last_received) > limit]
            for s in old:
                self.spool.remove(s)
                del self.studies[s.study_uid]
        for s in old:
            self.audit.event("purged", s.study_uid, version=s.version, instances=len(s.instances))
        return len(old)

    def _model_version(self) -> str | None:
        return getattr(self.settings.results, "model_version", None) or None

    def close(self) -> None:
        """Releases the state folder and closes the audit log."""
        self.audit.close()
        self.spool.close()

    def counts(self) -> dict[str, int]:
        """Studies per status."""
        with self._lock:
            return dict(Counter(s.status for s in self.studies.values()))

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> None:
        """The worker loop: ``tick()`` (e.g. a DICOMweb poll) then ``poll()``, every ``poll_s``, until ``stop`` is set."""
        while not stop.is_set():
            if tick is not None:
                tick()
            self.poll()
            stop.wait(self.settings.poll_s)


def _rounded(value) -> float | None:
    return None if value is None else round(float(value), 4)


class Watcher:
    """The DICOMweb pull path: every ``interval_s``, the new studies of ``source`` go into ``gateway``.

    ``source``: ``.new_studies() -> [StudyInstanceUID]``, ``.retrieve(uid) -> [(name, bytes)]``
    (wff.pacs.dicomweb.DicomwebSource). A failed poll is logged and tried again next interval.
    """

    def __init__(self, source, gateway: Gateway, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.gateway, self.interval_s, self.clock = source, gateway, interval_s, clock
        self._next = 0.0

    def fetch(self) -> int:
        """One poll: retrieves every new study; returns the instances taken in (new or changed)."""
        taken = 0
        for uid in self.source.new_studies():
            if self.gateway.over_watermark():
                log.warning("DICOMweb: not retrieving new studies: %s", self.gateway.over_watermark())
                break
            files = self.source.retrieve(uid)
            outcomes = self.gateway.add_instances([(uid, name, data) for name, data in files], None, source="dicomweb")
            taken += sum(o in (NEW, CHANGED) for o in outcomes)
        return taken

    def skip_next(self) -> None:
        """The next ``tick`` polls only after a full interval (after a ``fetch`` made at start-up)."""
        self._next = self.clock() + self.interval_s

    def tick(self) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.interval_s
        try:
            self.fetch()
        except Exception as e:  # noqa: BLE001 - the server may be back at the next poll; the failure is logged with its cause
            log.warning("DICOMweb poll failed, trying again in %g s: %s", self.interval_s, e)
