"""The gateway's spool: each study's instances and results on disk, and its state, surviving a restart.

Layout under the state folder::

    studies/<key>/state.json          the study's StudyState (written atomically: temp file + os.replace)
    studies/<key>/instances/<h>.dcm   one file per SOP Instance UID (h: a hash of that UID)
    studies/<key>/results/v<N>/<i>.dcm  result version N (SR, presentation state), kept until sent
    incoming/<random>.tmp             a file being written, renamed into place once on disk (a crash leaves it: recover drops it)

``key`` is a hash of the StudyInstanceUID, so no identifier appears in a path. The state of a
study moves ``received`` -> ``diagnosed`` (results made and on disk) -> ``stored`` (sent), or to
``dead-letter`` with the stage and reason; a new or changed instance puts any study back to
``received``, and its next diagnosis is the next result version.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

RECEIVED, DIAGNOSED, STORED, DEAD_LETTER = "received", "diagnosed", "stored", "dead-letter"
STATUSES = (RECEIVED, DIAGNOSED, STORED, DEAD_LETTER)
STATE_FILE = "state.json"
LOCK_FILE = "lock"  # held (flock) by the one process that uses the state folder
STATE_FORMAT = 1  # version of the state.json layout
PART10_HEADER = 132  # preamble + "DICM"
MIB = 1024 * 1024


def study_key(study_uid: str) -> str:
    """The folder name of a study: a hash of its StudyInstanceUID."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:32]


def content_hash(data: bytes) -> str:
    """SHA-256 of a Part 10 file's data set, file meta excluded: the same instance sent by another
    AE (whose title the file meta records) or fetched over DICOMweb hashes the same."""
    start = 0
    if data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL":
        (group_length,) = struct.unpack("<I", data[140:144])
        start = PART10_HEADER + 12 + group_length
    return hashlib.sha256(memoryview(data)[start:]).hexdigest()


@dataclass
class Instance:
    file: str  # file name under instances/
    sha256: str  # content_hash of the file
    size: int  # bytes


@dataclass
class StudyState:
    """Everything the gateway knows about one study; times are seconds since the epoch."""

    study_uid: str
    status: str = RECEIVED
    instances: dict[str, Instance] = field(default_factory=dict)  # SOP Instance UID -> file
    revision: int = 0  # counts new or changed instances
    first_received: float = 0.0
    last_received: float = 0.0  # last new or changed instance
    pending_since: float | None = None  # first change not yet diagnosed (max wait counts from here)
    version: int = 0  # result versions made so far; the current one is results/v<version>
    diagnosed_revision: int | None = None  # the revision the current version was made from
    results: list[str] = field(default_factory=list)  # the current version's files under results/v<version>
    summary: dict = field(default_factory=dict)  # the current version's diagnosis, p(malignant), model version
    attempts: int = 0  # failed attempts at the current stage (diagnose while received, send while diagnosed)
    next_attempt_at: float = 0.0
    last_error: str | None = None
    dead_letter: dict | None = None  # {"stage", "reason", "error", "at"} while status is dead-letter
    stored_at: float | None = None

    @property
    def key(self) -> str:
        return study_key(self.study_uid)

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> StudyState:
        data = dict(data)
        if data.pop("format", None) != STATE_FORMAT:
            raise ValueError(f"state format is not {STATE_FORMAT}")
        data["instances"] = {uid: Instance(**item) for uid, item in data["instances"].items()}
        if data["status"] not in STATUSES:
            raise ValueError(f"status {data['status']!r} is not one of {', '.join(STATUSES)}")
        return cls(**data)

    def mark_changed(self, now: float) -> None:
        """A new or changed instance arrived: the study waits for completeness again."""
        self.revision += 1
        self.first_received = self.first_received or now
        self.last_received = now
        if self.status != RECEIVED or self.pending_since is None:
            self.pending_since = now
        self.status = RECEIVED
        self.attempts, self.next_attempt_at, self.last_error, self.dead_letter = 0, 0.0, None, None

    def mark_diagnosed(self, revision: int, results: list[str], summary: dict) -> None:
        self.version += 1
        self.diagnosed_revision = revision
        self.results, self.summary = results, summary
        self.status, self.pending_since = DIAGNOSED, None
        self.attempts, self.next_attempt_at, self.last_error = 0, 0.0, None

    def mark_stored(self, now: float) -> None:
        self.status, self.stored_at = STORED, now
        self.attempts, self.next_attempt_at, self.last_error = 0, 0.0, None

    def mark_failed(self, error: str, next_attempt_at: float) -> None:
        self.attempts += 1
        self.last_error, self.next_attempt_at = error, next_attempt_at

    def mark_dead_letter(self, stage: str, reason: str, error: str, now: float) -> None:
        self.status = DEAD_LETTER
        self.dead_letter = {"stage": stage, "reason": reason, "error": error, "at": now}
        self.last_error, self.next_attempt_at = error, 0.0


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folder(path: Path) -> None:
    """``path`` and its missing parents, each new entry fsynced in its parent."""
    if path.is_dir():
        return
    _make_folder(path.parent)
    path.mkdir(exist_ok=True)
    _fsync_folder(path.parent)


class Spool:
    """The files under a state folder, with a running count of their bytes (for the disk watermark).

    Every write goes through this class; it is safe to use from several threads. One process at a
    time holds a state folder (an flock on its ``lock`` file, released by ``close`` or when the
    process ends, however it ends).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.incoming = self.root / "incoming"
        try:
            self.studies.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise OSError(f"cannot create the state folder {self.root}: {e.strerror or e}; give a writable --state folder") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(e.errno, f"the state folder {self.root} is in use by another wff pacs process; stop it, or give "
                                       "this one its own --state folder") from e
            raise
        self._lock = threading.Lock()
        self._bytes = _tree_bytes(self.studies) + _tree_bytes(self.incoming)

    def close(self) -> None:
        """Releases the state folder."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # accounting
    def size(self) -> int:
        """Bytes of the spool: every study's files and the writes in progress (the audit log is not counted)."""
        return self._bytes

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _count(self, delta: int) -> None:
        with self._lock:
            self._bytes = max(self._bytes + delta, 0)

    def _write(self, path: Path, data: bytes) -> None:
        """``data`` to ``path`` atomically and durably: a temp file under incoming/ (same file system),
        fsync, os.replace, fsync of the folder (the rename survives a power loss too).

        A crash mid-write leaves only the temp file, which ``drop_incoming`` removes at start-up.
        """
        _make_folder(path.parent)
        old = path.stat().st_size if path.exists() else 0
        tmp = self.incoming / f"{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_folder(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._count(len(data) - old)

    def _remove_tree(self, path: Path) -> None:
        if path.exists():
            size = _tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            self._count(-size)

    # state
    def study_dir(self, study_uid: str) -> Path:
        return self.studies / study_key(study_uid)

    def save(self, state: StudyState) -> None:
        self._write(self.study_dir(state.study_uid) / STATE_FILE, json.dumps(state.to_json(), indent=1).encode())

    def load(self) -> tuple[list[StudyState], list[str]]:
        """Every study's state, and one message per state file that cannot be read (its folder is left as it is)."""
        states, problems = [], []
        for path in sorted(self.studies.glob(f"*/{STATE_FILE}")):
            try:
                states.append(StudyState.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{path}: unreadable study state ({type(e).__name__}: {e}); move the folder away to clear this message")
        return states, problems

    def remove(self, state: StudyState) -> None:
        """The study's folder: instances, results and state."""
        self._remove_tree(self.study_dir(state.study_uid))

    # instances
    def put_instance(self, state: StudyState, sop_uid: str, data: bytes) -> Instance:
        """Writes (or replaces) the file of ``sop_uid`` in the study's spool."""
        name = hashlib.sha256(sop_uid.encode()).hexdigest()[:40] + ".dcm"
        self._write(self.study_dir(state.study_uid) / "instances" / name, data)
        return Instance(name, content_hash(data), len(data))

    def read_instances(self, study_uid: str, names: list[str]) -> list[tuple[str, bytes]]:
        """(file name, bytes) of the study's instance files ``names``."""
        folder = self.study_dir(study_uid) / "instances"
        return [(name, (folder / name).read_bytes()) for name in names]

    # results
    def write_results(self, state: StudyState, version: int, datasets: list[Dataset]) -> list[str]:
        """Result version ``version`` as Part 10 files; returns their names under results/v<version>."""
        folder = self.study_dir(state.study_uid) / "results" / f"v{version}"
        names = []
        for i, ds in enumerate(datasets):
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            names.append(f"{i:02d}.dcm")
            self._write(folder / names[-1], buffer.getvalue())
        return names

    def read_results(self, state: StudyState) -> list[Dataset]:
        folder = self.study_dir(state.study_uid) / "results" / f"v{state.version}"
        return [pydicom.dcmread(folder / name) for name in state.results]

    def drop_results(self, state: StudyState, keep_version: int | None = None) -> None:
        """Every result folder of the study but ``keep_version``'s (sent results need not stay on disk)."""
        for folder in (self.study_dir(state.study_uid) / "results").glob("v*"):
            if folder.name != f"v{keep_version}":
                self._remove_tree(folder)

    # files being written
    def drop_incoming(self) -> int:
        """Removes what a crash left under incoming/ (temp files of writes never finished); returns how many."""
        children = list(self.incoming.iterdir())
        for child in children:
            if child.is_dir():
                self._remove_tree(child)
            else:
                self._count(-child.stat().st_size)
                child.unlink(missing_ok=True)
        return len(children)
