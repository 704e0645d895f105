"""The gateway's audit log: one JSON object per line, without patient identifiers.

Each line has ``time`` (UTC, ISO 8601), ``event`` and the event's fields. A study is named by
``study``, a salted hash of its StudyInstanceUID (HMAC-SHA-256 with the state folder's salt,
first 16 hex digits): the lines of one study can be followed, but the UID cannot be recovered or
matched against another site's log. Fields are counts, statuses, durations, AE titles, coarse
failure reasons and the model version; never a name, ID, date of birth, UID or pixel value.

Events: ``started``, ``stopped``, ``recovered``, ``association`` (released) and
``association-dropped`` (aborted or connection lost), each with the instances it delivered (all
of them kept), ``association-rejected``, ``received`` (a study's new or changed instances, per
association or DICOMweb retrieval), ``ignored``, ``diagnosed``, ``stored``, ``retry``, ``dead-letter``, ``superseded``
(a result discarded because an instance arrived during its diagnosis), ``purged``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path

SALT_FILE = "audit-salt"
SALT_BYTES = 32
STUDY_REF_HEX = 16


def load_salt(state_dir: str | Path) -> bytes:
    """The state folder's salt; made (random, readable by the owner only) the first time."""
    path = Path(state_dir) / SALT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(SALT_BYTES))
    return bytes.fromhex(path.read_text().strip())


class AuditLog:
    """Appends events to ``path`` (JSON lines); safe to call from several threads."""

    def __init__(self, path: str | Path, salt: bytes) -> None:
        self.path = Path(path)
        self._salt = salt
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot open the audit log {self.path}: {e.strerror or e}; give a writable --audit-log file") from e

    def study_ref(self, study_uid: str) -> str:
        """The salted hash that stands for ``study_uid`` in the log."""
        return hmac.new(self._salt, study_uid.encode(), hashlib.sha256).hexdigest()[:STUDY_REF_HEX]

    def event(self, event: str, study_uid: str | None = None, **fields) -> dict:
        """Writes one line and returns it as a dict; ``study_uid`` is written only as its hash."""
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event}
        if study_uid is not None:
            record["study"] = self.study_ref(study_uid)
        record.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        with self._lock:
            self._file.close()
