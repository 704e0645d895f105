"""``wff pacs listen`` and ``wff pacs watch``: thin click commands over wff.pacs.gateway, scp and dicomweb.

Both check at start-up, in this order: the settings (AE titles, --send-to, UID root: a usage
error, exit 2), then the diagnosis server (ready within --startup-timeout at --url), the state
folder (writable, not used by another gateway), the metrics port and the DICOM port (listen) or
the DICOMweb server (watch); a failure stops them with ``wff: error: ...`` (exit 1) naming what to
fix. Then they run until SIGTERM or Ctrl-C, which lets the study in hand finish its step and
exits 0; whatever is left is finished after the next start (the state is on disk).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path

import click

from wff.cli import WffError
from wff.client.cli import client_options
from wff.pacs.settings import GatewaySettings

_FIELDS = {f.name: f for f in dataclasses.fields(GatewaySettings)}


def _default(name: str):
    return _FIELDS[name].default


def _options(*options):
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


COMMON_OPTIONS = (
    click.option("--ae-title", default=_default("ae_title"), show_default=True,
                 help="The gateway's AE title: called AE for listen, calling AE when sending by C-STORE."),
    click.option("--send-to", help="Send results by C-STORE to this AE: AET@HOST:PORT (e.g. ORTHANC@pacs:4242)."),
    click.option("--stow", help="Send results by STOW-RS to this DICOMweb root URL instead (e.g. http://pacs:8042/dicom-web)."),
    click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=_default("state_dir"),
                 show_default=True, help="Folder of the spool, each study's state, the audit log and its salt."),
    click.option("--quiet-seconds", type=click.FloatRange(min=0, min_open=True), default=_default("quiet_seconds"), show_default=True,
                 help="A study is complete once no instance arrived for this long."),
    click.option("--max-wait", "max_wait_s", type=click.FloatRange(min=0, min_open=True), default=_default("max_wait_s"),
                 show_default=True, help="Seconds after a study's first pending instance it is diagnosed, even if not quiet."),
    click.option("--retry-initial", "retry_initial_s", type=click.FloatRange(min=0, min_open=True),
                 default=_default("retry_initial_s"), show_default=True, help="Pause after a study's first failed attempt, seconds."),
    click.option("--retry-max", "retry_max_s", type=click.FloatRange(min=0, min_open=True), default=_default("retry_max_s"),
                 show_default=True, help="Longest pause between two attempts (the pause doubles up to it), seconds."),
    click.option("--max-attempts", type=click.IntRange(min=1), default=_default("max_attempts"), show_default=True,
                 help="Attempts per stage (diagnose, send) before a study becomes a dead letter."),
    click.option("--retry-dead-letters", is_flag=True, help="At start-up, give every dead letter a fresh set of attempts."),
    click.option("--min-free-mb", type=click.IntRange(min=0), default=_default("min_free_mb"), show_default=True,
                 help="Refuse new data when the state folder's disk has less free space."),
    click.option("--max-spool-mb", type=click.IntRange(min=0), default=_default("max_spool_mb"), show_default=True,
                 help="Refuse new data when the state folder holds more (0: no limit)."),
    click.option("--keep-hours", type=click.FloatRange(min=0), default=_default("keep_hours"), show_default=True,
                 help="Remove a stored study's files this long after its last change."),
    click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path), help="Audit log, JSON lines [default: STATE/audit.jsonl]."),
    click.option("--metrics-port", type=click.IntRange(min=0, max=65535),
                 help="Serve Prometheus counters on http://127.0.0.1:PORT/metrics [default: off]."),
    click.option("--startup-timeout", "startup_timeout_s", type=click.FloatRange(min=0), default=_default("startup_timeout_s"),
                 show_default=True, help="Seconds to wait at start-up for the diagnosis server to be ready."),
    click.option("--uid-root", help="UID root of the result objects (your organisation's OID) [default: spine-wff's]."),
    click.option("--sr-kind", type=click.Choice(["comprehensive3d", "comprehensive"]),
                 help="SR IOD of the report [default: comprehensive3d]."),
)


def _settings(client: dict, uid_root: str | None, sr_kind: str | None, **values) -> GatewaySettings:
    """GatewaySettings from the command's options; a bad value is a usage error naming the option."""
    from wff.pacs.results import ResultSettings

    url = client.pop("url")
    try:
        results = ResultSettings(**{k: v for k, v in {"uid_root": uid_root, "sr_kind": sr_kind}.items() if v is not None})
        return GatewaySettings(url=url, client=client, results=results, **values)
    except ValueError as e:
        raise click.UsageError(str(e)) from e


def _sender(settings: GatewaySettings):
    from wff.pacs.send import CStoreSender, StowSender

    if settings.stow:
        return StowSender(settings.stow)
    return CStoreSender(settings.send_to, settings.ae_title)


def _connect(settings: GatewaySettings):
    """A DiagnosisClient on a server that reports ready, and the settings with the served model's identity."""
    from wff.client.grpc_client import DiagnosisClient, DiagnosisError

    try:
        client = DiagnosisClient(settings.url, **settings.client)
    except DiagnosisError as e:
        raise WffError(f"cannot connect to the diagnosis server at {settings.url}: {e}") from e
    deadline = time.monotonic() + settings.startup_timeout_s
    while not client.is_ready():
        if time.monotonic() >= deadline:
            client.close()
            raise WffError(f"no diagnosis server is ready at {settings.url} (gRPC) after {settings.startup_timeout_s:g} s; "
                           "start it (wff serve) or give its address with --url HOST:PORT, and --startup-timeout to wait longer")
        time.sleep(0.5)
    try:
        identity = client.model_identity()
        results = settings.results.with_model(identity)
    except (DiagnosisError, ValueError) as e:
        client.close()
        raise WffError(f"the server at {settings.url} does not say which model it serves ({e}); "
                       "serve a repository built by this version's wff repo build") from e
    return client, dataclasses.replace(settings, results=results)


def _start(settings: GatewaySettings, retry_dead_letters: bool):
    """(gateway, client, metrics server or None), with the server checked and the state recovered."""
    from wff.pacs.gateway import Gateway
    from wff.pacs.metrics import MetricsServer

    client, settings = _connect(settings)
    try:
        gateway = Gateway(settings, _sender(settings), diagnose=client.diagnose)
    except (OSError, ValueError) as e:
        client.close()
        raise WffError(str(e)) from e
    if retry_dead_letters:
        gateway.retry_dead_letters()
    counts = gateway.recover()
    metrics = None
    if settings.metrics_port is not None:
        try:
            metrics = MetricsServer(gateway.metrics, settings.metrics_port)
        except OSError as e:
            client.close()
            gateway.close()
            raise WffError(e.strerror or str(e)) from e
    if counts["received"] or counts["diagnosed"]:
        click.echo(f"resuming {counts['received']} studies to diagnose and {counts['diagnosed']} to send", err=True)
    return gateway, client, metrics


def _run(gateway, tick=None) -> None:
    """The worker loop until SIGTERM or Ctrl-C: the study in hand finishes its step first; a second signal stops at once."""
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stop.is_set():  # a second signal: stop now, the state on disk is finished after the next start
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    gateway.audit.event("started", model_version=gateway.settings.results.model_version)
    try:
        gateway.run(stop, tick)
    except OSError as e:  # the state folder's disk failed or filled up: nothing more can be kept
        raise WffError(f"cannot write to the state folder {gateway.settings.state_dir}: {e.strerror or e}; free disk space or "
                       "fix its permissions, then start again (what is on disk is finished after the start)") from e
    finally:
        gateway.audit.event("stopped", studies=gateway.counts())


def _stop(gateway, diagnosis_client, metrics) -> None:
    if metrics is not None:
        metrics.close()
    diagnosis_client.close()
    gateway.close()


@click.group()
def pacs() -> None:
    """DICOM gateway: receive MR studies from a PACS, diagnose them, store a DICOM SR and a presentation state back."""


@pacs.command()
@click.option("--host", default=_default("host"), show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=_default("port"), show_default=True, help="TCP port of the C-STORE SCP.")
@click.option("--allow", multiple=True, metavar="AET", help="Calling AE title to accept (repeat for several); default: any.")
@_options(*COMMON_OPTIONS)
@client_options
def listen(client: dict, uid_root: str | None, sr_kind: str | None, retry_dead_letters: bool, **values) -> None:
    """Receive studies by DICOM C-STORE, diagnose each once complete, send the results by C-STORE (--send-to) or STOW-RS (--stow).

    Accepts MR Image Storage, Enhanced MR Image Storage and C-ECHO; other SOP classes are refused
    at association. Each instance is on disk before its C-STORE is answered with success; an
    aborted association keeps what was answered.
    """
    from wff.pacs.scp import StoreSCP

    # pynetdicom's debug output lists each message's SOP Instance UID: never below INFO
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLogger().getEffectiveLevel()))
    values["allow"] = tuple(values["allow"])
    if not values.get("send_to") and not values.get("stow"):
        raise click.UsageError("give --send-to AET@HOST:PORT (C-STORE) or --stow URL (STOW-RS): where results go")
    settings = _settings(client, uid_root, sr_kind, **values)
    gateway, diagnosis_client, metrics = _start(settings, retry_dead_letters)
    scp = StoreSCP(gateway)
    try:
        try:
            scp.start()
        except OSError as e:
            raise WffError(e.strerror or str(e)) from e
        click.echo(f"listening as {settings.ae_title} on {settings.host}:{scp.port}; results to "
                   f"{settings.send_to or settings.stow}; state in {settings.state_dir}", err=True)
        _run(gateway)
    finally:
        scp.stop()
        _stop(gateway, diagnosis_client, metrics)


@pacs.command()
@click.option("--dicomweb", required=True, help="DICOMweb root URL to poll for new MR studies (QIDO-RS) and fetch them from (WADO-RS).")
@click.option("--watch-interval", "watch_interval_s", type=click.FloatRange(min=0, min_open=True), default=_default("watch_interval_s"),
              show_default=True, help="Seconds between two polls.")
@click.option("--since", help="Take only studies whose StudyDate is on or after this date: YYYYMMDD, or Nd for the "
                             "last N days (0d: today), e.g. 20240101 or 7d [default: every study].")
@_options(*COMMON_OPTIONS)
@client_options
def watch(client: dict, uid_root: str | None, sr_kind: str | None, retry_dead_letters: bool, **values) -> None:
    """Poll a DICOMweb server for new MR studies, diagnose each, send the results by STOW-RS (--stow; default: the
    --dicomweb server) or C-STORE (--send-to)."""
    from wff.pacs.dicomweb import DicomwebError, DicomwebSource
    from wff.pacs.gateway import Watcher

    if not values.get("send_to") and not values.get("stow"):
        values["stow"] = values["dicomweb"]
    settings = _settings(client, uid_root, sr_kind, **values)
    try:
        source = DicomwebSource(settings.dicomweb, state_file=settings.state_dir / "dicomweb-taken.json", since=settings.since)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    gateway, diagnosis_client, metrics = _start(settings, retry_dead_letters)
    try:
        watcher = Watcher(source, gateway, settings.watch_interval_s)
        try:
            watcher.fetch()  # the first poll at start-up: an unreachable server is an error here, a warning later
        except DicomwebError as e:
            raise WffError(f"{e}; check --dicomweb (the DICOMweb root, e.g. http://pacs:8042/dicom-web) and that the server runs") from e
        watcher.skip_next()
        window = f" for studies dated from {source.since_date()} on" if settings.since else ""
        click.echo(f"watching {settings.dicomweb} every {settings.watch_interval_s:g} s{window}; results to "
                   f"{settings.send_to or settings.stow}; state in {settings.state_dir}", err=True)
        _run(gateway, watcher.tick)
    finally:
        _stop(gateway, diagnosis_client, metrics)
