"""``wff diagnose`` and ``wff evaluate``: thin click commands over grpc_client.py and evaluate.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from wff.client.grpc_client import DEFAULT_TIMEOUT_S

url_option = click.option("--url", default="localhost:8001", show_default=True, help="tritonserver gRPC endpoint, host:port.")
ssl_option = click.option("--ssl", is_flag=True, help="Use TLS.")
certs_option = click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False), help="PEM root certificates for --ssl.")
timeout_option = click.option("--timeout", "timeout_s", default=DEFAULT_TIMEOUT_S, show_default=True,
                              type=click.FloatRange(min=0, min_open=True), help="Seconds to wait for each answer.")


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


def _write_json(data: dict, target: str) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        click.echo(text, nl=False)
    else:
        Path(target).write_text(text)


@click.command()
@click.argument("patient_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--age", type=float, help="Age in years; overrides the DICOM PatientAge (the server checks the range).")
@url_option
@ssl_option
@certs_option
@timeout_option
@click.option("--json", "json_out", metavar="FILE|-", help="Write the diagnosis as JSON to FILE, or stdout with -.")
def diagnose(patient_dir: Path, age: float | None, url: str, ssl: bool, root_certificates: str | None, timeout_s: float, json_out: str | None) -> None:
    """Send one patient's DICOM files (PATIENT_DIR, .json/.csv skipped) and print the diagnosis."""
    from wff.client.grpc_client import DiagnosisClient, DiagnosisError, read_patient_files

    try:
        files = read_patient_files(patient_dir)
        with DiagnosisClient(url, ssl, root_certificates, timeout_s) as client:
            dx = client.diagnose(files, age)
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="PATIENT_DIR") from e
    except DiagnosisError as e:
        raise click.ClickException(str(e)) from e
    if json_out:
        _write_json(dx.to_dict(), json_out)
    if json_out != "-":
        click.echo(format_diagnosis(dx))


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, help="labels.csv split to evaluate.")
@url_option
@ssl_option
@certs_option
@timeout_option
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1), help="Requests in flight.")
@click.option("--json", "json_out", metavar="FILE|-", help="Write metrics as JSON to FILE, or stdout with -.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path), help="Write one row per patient to this CSV.")
def evaluate(dataset: Path, split: str, url: str, ssl: bool, root_certificates: str | None, timeout_s: float,
             concurrency: int, json_out: str | None, csv_out: Path | None) -> None:
    """Diagnose every patient of a split over gRPC; print Table 3 (ACC, AUC, SE, SP) for the six strategies."""
    from wff.client import evaluate as ev
    from wff.client.grpc_client import DiagnosisError
    from wff.ensemble.metrics import format_table

    try:
        records = ev.load_records(dataset, split)
    except (FileNotFoundError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="DATASET") from e
    if not records:
        raise click.BadParameter(f"no patients with split {split!r} in {dataset / 'labels.csv'}", param_hint="--split")
    with click.progressbar(length=len(records), label=f"diagnosing {len(records)} patients", file=sys.stderr) as bar:
        try:
            report = ev.evaluate(records, url=url, concurrency=concurrency, timeout_s=timeout_s, ssl=ssl,
                                 root_certificates=root_certificates, on_done=lambda _: bar.update(1))
        except DiagnosisError as e:
            raise click.ClickException(str(e)) from e
    for r in report.results:
        if r.error:
            click.echo(f"{r.patient_id}: {r.error}", err=True)
    if csv_out:
        report.write_csv(csv_out)
    if json_out:
        _write_json(report.to_dict(), json_out)
    if json_out != "-":
        done = len(report.results) - report.errors
        click.echo(f"{done} of {len(report.results)} patients diagnosed ({report.errors} errors), "
                   f"{report.seconds_per_patient:.2f} s per patient (wall time / patients, concurrency {concurrency})")
        click.echo(format_table(report.table) if report.table else "no diagnoses: no metrics")
        click.echo(f"served strategy: {report.settings.served_strategy}")
    if report.errors == len(report.results):
        raise click.ClickException("every request failed")
