"""``wff diagnose`` and ``wff evaluate``: thin click commands over grpc_client.py, evaluate.py, report.py and overlay.py."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import click

from wff.cli import WffError, json_option, write_json
from wff.client.grpc_client import DEFAULT_MAX_BYTES, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S

PEM = click.Path(exists=True, dir_okay=False)
TLS_OPTIONS = (
    click.option("--ssl", is_flag=True, help="TLS with the system's root certificates (implied by --tls-ca/--tls-cert/--tls-key)."),
    click.option("--tls-ca", type=PEM, help="PEM root certificate(s) the server's certificate must chain to (TLS with these roots)."),
    click.option("--tls-cert", type=PEM, help="PEM client certificate, for a server that requires mutual TLS (with --tls-key)."),
    click.option("--tls-key", type=PEM, help="PEM private key of --tls-cert."),
)
CONNECTION_OPTIONS = (
    click.option("--url", default="localhost:8001", show_default=True, help="tritonserver gRPC endpoint, host:port."),
    click.option("--timeout", "timeout_s", default=DEFAULT_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Seconds to wait for each answer, retries included."),
    click.option("--retries", default=DEFAULT_RETRIES, show_default=True, type=click.IntRange(min=0),
                 help="Further attempts, with growing pauses, when the server answers UNAVAILABLE (overloaded, restarting, not listening)."),
    click.option("--max-bytes", default=DEFAULT_MAX_BYTES, show_default=True, type=click.IntRange(min=1),
                 help="Largest patient sent, in file bytes; larger ones are refused before sending (the server's serving.max_bytes)."),
)


def _with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def tls_options(command):
    """--ssl, --tls-ca, --tls-cert, --tls-key; the command receives them as one dict ``tls``, keyword arguments of
    DiagnosisClient."""

    @functools.wraps(command)
    def wrapper(*args, ssl: bool, tls_ca: str | None, tls_cert: str | None, tls_key: str | None, **kwargs):
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together: give the client certificate and its private key")
        return command(*args, tls={"ssl": ssl, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}, **kwargs)

    return _with_options(wrapper, TLS_OPTIONS)


def client_options(command):
    """--url, --timeout, --retries, --max-bytes and the TLS options; the command receives them as one dict
    ``client``: ``url`` plus DiagnosisClient's keyword arguments."""

    @functools.wraps(command)
    def wrapper(*args, url: str, timeout_s: float, retries: int, max_bytes: int, tls: dict, **kwargs):
        return command(*args, client={"url": url, "timeout_s": timeout_s, "retries": retries, "max_bytes": max_bytes, **tls}, **kwargs)

    return _with_options(tls_options(wrapper), CONNECTION_OPTIONS)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def format_diagnosis(dx) -> str:
    """The diagnosis as a short readable report (no identifiers)."""
    age = "not known: no age term" if math.isnan(dx.age_used) else f"{dx.age_used:g} years ({dx.notes.get('age_source', '?')}), A = {_fmt(dx.age_a)}"
    lines = [f"Diagnosis: {dx.label.upper()}   P(malignant) = {_fmt(dx.p_malignant)}", f"Age: {age}", "Series:"]
    votes = {1: "malignant", 0: "benign", -1: "abstained"}
    for info, vote, m in zip(dx.series_info, dx.series_votes, dx.series_m):
        desc = info.get("description") or ""
        lines.append(f"  [{info.get('index', '?')}] {info.get('sequence', '?'):<5} {desc[:28]:<28} "
                     f"{info.get('n_slices', '?'):>3} slices  vote {votes.get(int(vote), vote):<10} M = {_fmt(float(m))}")
    for skipped in dx.notes.get("skipped_series", []):
        lines.append(f"  skipped: {skipped.get('description', '')!r}: {skipped.get('reason', '')}")
    return "\n".join(lines)


def _overlay_image_config(profile_json: Path | None, client: dict):
    """The detector input configuration to decode overlays with: the given profile.json's, else the server's size."""
    from wff.client.overlay import served_image_config
    from wff.config import load_profile

    if profile_json is None:
        return served_image_config(**client)
    try:
        return load_profile(profile_json).image
    except ValueError as e:
        raise WffError(f"--profile-file: {e}") from e


overlay_profile_option = click.option(
    "--profile-file", "profile_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="profile.json of the served model, for --overlay (default: the served detector's input size and the built-in intensity window).")


@click.command()
@click.argument("patient_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--age", type=float, help="Age in years; overrides the DICOM PatientAge (the server checks the range).")
@client_options
@json_option("the diagnosis")
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write one PNG per series to this folder: the detected boxes, class and probability on the detector input (Fig. 4).")
@overlay_profile_option
@click.option("--sr", "sr_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the result as DICOM to this folder: SR.dcm (TID 1500 measurement report) and PR.dcm (presentation "
                   "state with the boxes), new series of the patient's study, as wff pacs sends them (needs spine-wff[pacs]).")
@click.option("--sr-kind", type=click.Choice(["comprehensive3d", "comprehensive"]), default="comprehensive3d", show_default=True,
              help="SR storage class of --sr: Comprehensive 3D SR (IHE AI Results) or Comprehensive SR.")
@click.option("--uid-root", metavar="ROOT", help="UID root of the --sr objects (default: spine-wff's, wff.pacs.uids); "
                                                "the gateway's, to get the objects it would send.")
def diagnose(patient_dir: Path, age: float | None, client: dict, json_out: str | None, overlay_dir: Path | None,
             profile_json: Path | None, sr_dir: Path | None, sr_kind: str, uid_root: str | None) -> None:
    """Send one patient's DICOM files (PATIENT_DIR, .json/.csv skipped) and print the diagnosis."""
    from wff.client.grpc_client import DiagnosisClient, DiagnosisError, read_patient_files

    result_settings = _result_settings(sr_kind, uid_root) if sr_dir else None
    try:
        files = read_patient_files(patient_dir)
        with DiagnosisClient(**client) as diagnosis_client:
            dx = diagnosis_client.diagnose(files, age)
            settings = diagnosis_client.fusion_settings() if overlay_dir else None
            identity = diagnosis_client.model_identity() if sr_dir else None
        image_cfg = _overlay_image_config(profile_json, client) if overlay_dir else None
    except (DiagnosisError, FileNotFoundError, ValueError) as e:
        raise WffError(str(e)) from e
    if json_out:
        write_json(dx.to_dict(), json_out)
    if sr_dir:
        written = write_results(files, dx, result_settings.with_model(identity), sr_dir)
        click.echo(f"DICOM results written: {', '.join(str(p) for p in written)}", err=True)
    if overlay_dir:
        from wff.client.overlay import write_overlays

        try:
            paths = write_overlays(files, dx, image_cfg, overlay_dir, patient_dir.resolve().name, settings.det_threshold)
        except ValueError as e:
            raise WffError(f"overlays not written: {e}") from e
        click.echo(f"{len(paths)} overlay PNGs written to {overlay_dir}", err=True)
    if json_out != "-":
        click.echo(format_diagnosis(dx))


def _result_settings(sr_kind: str, uid_root: str | None):
    """wff.pacs.results.ResultSettings of --sr-kind and --uid-root; a WffError naming the extra when its
    libraries are not installed."""
    try:
        from wff.pacs.results import ResultSettings
    except ModuleNotFoundError as e:
        raise WffError(f"--sr needs {e.name}, which is not installed; install it with pip install 'spine-wff[pacs]'") from e
    try:
        return ResultSettings(sr_kind=sr_kind, **({"uid_root": uid_root} if uid_root else {}))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--uid-root") from e


def write_results(files, dx, settings, out_dir: Path) -> list[Path]:
    """SR.dcm and PR.dcm of ``dx`` (the diagnosis of ``files``) in ``out_dir`` (created); ``settings`` are
    wff.pacs.results.ResultSettings with the served model's identity."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    from wff.pacs.results import make_results

    try:
        datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in files]
        objects = make_results(datasets, dx, settings=settings)
    except (ValueError, InvalidDicomError) as e:
        raise WffError(f"DICOM results not written: {e}") from e
    paths = [out_dir / "SR.dcm", out_dir / "PR.dcm"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for ds, path in zip(objects, paths):
            ds.save_as(path, enforce_file_format=True)
    except OSError as e:
        raise WffError(f"cannot write the DICOM results to {out_dir}: {e.strerror or e}; give a writable folder (--sr)") from e
    return paths


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, help="labels.csv split to evaluate.")
@client_options
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1), help="Requests in flight.")
@json_option("the metrics and every patient's result")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path), help="Write one row per patient to this CSV.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the report to this folder: table3, per_location (Fig. 6), sequences (Fig. 7) as JSON/CSV/PNG, roc.png, patients.csv.")
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write Fig. 4-style overlay PNGs of the misclassified patients (served strategy) to this folder.")
@overlay_profile_option
def evaluate(dataset: Path, split: str, client: dict, concurrency: int, json_out: str | None, csv_out: Path | None,
             report_dir: Path | None, overlay_dir: Path | None, profile_json: Path | None) -> None:
    """Diagnose every patient of a split over gRPC; print Table 3 (ACC, AUC, SE, SP) for the six strategies,
    the errors per vertebral location (Fig. 6) and the ACC per MRI sequence (Fig. 7).

    Exit status 0 when every patient was diagnosed; 1 when any failed (after every output is written,
    with the failures counted by reason on stderr), the dataset cannot be read or no server answered;
    2 for bad arguments."""
    from wff.client import evaluate as ev
    from wff.client import report as rp
    from wff.client.grpc_client import DiagnosisError
    from wff.ensemble.fusion import PAPER_ROW, PAPER_WEIGHTS, VOTE_THRESHOLD
    from wff.ensemble.metrics import format_table
    from wff.records import load_records

    try:
        records = load_records(dataset, split)
    except (FileNotFoundError, ValueError) as e:
        raise WffError(str(e)) from e
    if not records:
        raise WffError(f"no patients with split {split!r} in {dataset / 'labels.csv'}; give a split that labels.csv has (--split)")
    with click.progressbar(length=len(records), label=f"diagnosing {len(records)} patients", file=sys.stderr) as bar:
        try:
            report = ev.evaluate(records, concurrency=concurrency, on_done=lambda _: bar.update(1), **client)
        except DiagnosisError as e:
            raise WffError(str(e)) from e
    for r in report.results:
        if r.error:
            click.echo(f"{r.patient_id}: {r.error}", err=True)
    if csv_out:
        report.write_csv(csv_out)
    data = report.to_dict()
    if json_out:
        write_json(data, json_out)
    if report_dir:
        files = rp.write_report(report, report_dir)
        click.echo(f"report: {len(files)} files written to {report_dir}", err=True)
    if overlay_dir and report.errors < len(report.results):
        write_misclassified_overlays(report, records, overlay_dir, profile_json, client)
    if json_out != "-":
        done = len(report.results) - report.errors
        click.echo(f"{done} of {len(report.results)} patients diagnosed ({report.errors} errors), "
                   f"{report.seconds_per_patient:.2f} s per patient (wall time / patients, concurrency {concurrency})")
        click.echo(format_table(report.table) if report.table else "no diagnoses: no metrics")
        click.echo(f"served strategy: {report.settings.served_strategy}, weights {report.settings.served_weights}; "
                   f"{PAPER_ROW}: weights {PAPER_WEIGHTS['Det-Seq-Age']}, vote threshold {VOTE_THRESHOLD:g}")
        if report.table:
            click.echo("")
            click.echo(rp.format_per_location(data["per_location"]))
            click.echo("")
            click.echo(rp.format_sequences(data["sequences"]))
    if report.errors:
        click.echo(format_failures(report.failures(), len(report.results)), err=True)
        raise WffError(f"{report.errors} of {len(report.results)} patients failed (counted by reason above)")


def format_failures(failures: dict[str, list[str]], patients: int, shown: int = 5) -> str:
    """The failed patients counted by reason, a few ids each."""
    lines = [f"{sum(len(ids) for ids in failures.values())} of {patients} patients failed:"]
    for reason, ids in failures.items():
        more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
        lines.append(f"  {len(ids):>4}  {reason}: {', '.join(ids[:shown])}{more}")
    return "\n".join(lines)


def write_misclassified_overlays(report, records, overlay_dir: Path, profile_json: Path | None, client: dict) -> tuple[int, int]:
    """Overlays of every patient whose served diagnosis is wrong, named after its dataset folder;
    returns (PNGs written, misclassified patients)."""
    from wff.client.grpc_client import DiagnosisError, read_patient_files
    from wff.client.overlay import write_overlays
    from wff.config import LABELS

    try:
        image_cfg = _overlay_image_config(profile_json, client)
    except (DiagnosisError, ValueError) as e:
        raise WffError(f"overlays not written: {e}") from e
    folders = {r.patient_id: r.path for r in records}
    wrong = [r for r in report.results if r.diagnosis is not None and r.diagnosis.label != LABELS[r.label]]
    written = 0
    for r in wrong:
        try:
            written += len(write_overlays(read_patient_files(folders[r.patient_id]), r.diagnosis, image_cfg, overlay_dir,
                                          r.patient_id, report.settings.det_threshold))
        except (FileNotFoundError, ValueError) as e:
            click.echo(f"{r.patient_id}: overlay not written: {e}", err=True)
    click.echo(f"overlays: {written} PNGs of {len(wrong)} misclassified patients written to {overlay_dir}", err=True)
    return written, len(wrong)
