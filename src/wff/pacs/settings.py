"""Every setting of the PACS gateway (``wff pacs listen`` / ``wff pacs watch``) in one place.

:class:`GatewaySettings` holds them with their defaults; each CLI flag overrides one field (the
flag is named in the field's comment). The results' own settings (UID root, SR kind, model
name/version/digest) are a :class:`wff.pacs.results.ResultSettings` held in ``results``.

AE titles and the ``--send-to`` address are checked when the settings are made (with
:func:`wff.pacs.send.check_ae_title` and :func:`~wff.pacs.send.parse_destination`), so a bad value
is refused at start-up with the rule it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wff.pacs.dicomweb import parse_since
from wff.pacs.send import check_ae_title, parse_destination

if TYPE_CHECKING:
    from wff.pacs.results import ResultSettings


@dataclass(frozen=True)
class GatewaySettings:
    # receiving (wff pacs listen)
    ae_title: str = "SPINE_WFF"  # --ae-title: the gateway's own AE title (the called AE)
    host: str = "0.0.0.0"  # --host: address the C-STORE SCP listens on (0.0.0.0: every interface)
    port: int = 11112  # --port: the C-STORE SCP's TCP port
    allow: tuple[str, ...] = ()  # --allow (repeatable): calling AE titles accepted; empty = any
    # receiving (wff pacs watch)
    dicomweb: str | None = None  # --dicomweb: DICOMweb base URL polled for new MR studies (QIDO-RS/WADO-RS)
    watch_interval_s: float = 30.0  # --watch-interval: seconds between two QIDO-RS polls
    since: str | None = None  # --since: only studies with StudyDate on or after YYYYMMDD, or within the last Nd; None = all
    # completeness
    quiet_seconds: float = 10.0  # --quiet-seconds: a study is complete once no instance arrived for this long
    max_wait_s: float = 300.0  # --max-wait: ... or this long after its first pending instance, even if not quiet
    poll_s: float = 1.0  # how often the worker looks for due studies
    # diagnosis (tritonserver over gRPC; the client's own options are wff diagnose's)
    url: str = "localhost:8001"  # --url: tritonserver gRPC endpoint, host:port
    client: dict = field(default_factory=dict)  # --timeout/--retries/--max-bytes/TLS: DiagnosisClient keyword arguments
    startup_timeout_s: float = 30.0  # --startup-timeout: how long start-up waits for the server to report ready
    # sending results back
    send_to: str | None = None  # --send-to: C-STORE destination AET@HOST:PORT
    stow: str | None = None  # --stow: STOW-RS URL (instead of --send-to)
    # retries: per study and stage (diagnose, send), pause = min(retry_max_s, retry_initial_s * 2^(n-1))
    retry_initial_s: float = 5.0  # --retry-initial: pause after the first failed attempt
    retry_max_s: float = 300.0  # --retry-max: longest pause between two attempts
    max_attempts: int = 8  # --max-attempts: attempts per stage before the study becomes a dead letter
    # spool on disk
    state_dir: Path = Path("wff-pacs")  # --state: spool, per-study state, audit log and salt
    min_free_mb: int = 1024  # --min-free-mb: refuse associations/instances when the disk has less free
    max_spool_mb: int = 0  # --max-spool-mb: refuse when the spool holds more than this; 0 = no limit
    keep_hours: float = 24.0  # --keep-hours: a stored study's files are removed this long after its last change
    # operations
    audit_log: Path | None = None  # --audit-log: JSON lines file; None = STATE/audit.jsonl
    metrics_port: int | None = None  # --metrics-port: Prometheus text on 127.0.0.1:PORT/metrics; None = off
    # results (UID root, SR kind, model name/version/digest, manufacturer)
    results: ResultSettings | Any = None  # --uid-root, --sr-kind; None = ResultSettings()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "--ae-title"))
        object.__setattr__(self, "allow", tuple(check_ae_title(ae, "--allow") for ae in self.allow))
        if self.send_to is not None:
            try:
                parse_destination(self.send_to)
            except ValueError as e:
                raise ValueError(f"--send-to: {e}") from None
        if self.since is not None:
            parse_since(self.since)
        if self.send_to is not None and self.stow is not None:
            raise ValueError("give either --send-to AET@HOST:PORT (C-STORE) or --stow URL (STOW-RS), not both")
        for name in ("quiet_seconds", "max_wait_s", "poll_s", "watch_interval_s", "retry_initial_s", "retry_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not a TCP port (0-65535)")
        if self.results is None:
            from wff.pacs.results import ResultSettings

            object.__setattr__(self, "results", ResultSettings())
        object.__setattr__(self, "state_dir", Path(self.state_dir))

    @property
    def audit_path(self) -> Path:
        return Path(self.audit_log) if self.audit_log is not None else self.state_dir / "audit.jsonl"

    @property
    def uid_root(self) -> str:
        """The UID root of the objects the gateway makes (never taken as input)."""
        return str(self.results.uid_root)

    def retry_pause(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1-based): doubling, capped at retry_max_s."""
        return min(self.retry_max_s, self.retry_initial_s * 2 ** (max(failures, 1) - 1))
