"""``wff demo``: the whole job end to end, on the embedded CPU default.

synthesize a DICOM dataset -> train (small profile, k-fold CV of the fusion weights) -> export
ONNX -> build the embedded Triton repository -> start the real tritonserver -> evaluate the
test split over gRPC -> print Table 3, the per-location and per-sequence tables, write the
report (JSON, CSV, PNG) and the overlays of the misclassified patients -> stop the server ->
print where everything is and the next commands to try. Each stage is skipped when its output
is already there (``--force`` redoes all but the dataset).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import click

from wff.cli import WffError, apply_overrides, progress_printer
from wff.config import PROFILES, get_profile


def _stage(name: str) -> None:
    click.echo(click.style(f"== {name}", bold=True), err=True)


def format_next_steps(out: Path, dataset: Path, report_files: dict[str, Path], overlay_dir: Path, overlays: int,
                      misclassified: int, patient: Path, wff: str = "wff") -> str:
    """Where this run's results are, and three commands to try next with its real paths.

    ``report_files``: {name: path} of the report; ``overlays`` PNGs were written to ``overlay_dir``
    for ``misclassified`` patients; ``patient``: a test patient's folder for the diagnose example.
    """
    artifacts, report_dir = out / "artifacts", out / "report"
    figures = [str(path) for name, path in sorted(report_files.items()) if name.endswith(".png")]
    if misclassified:
        overlay_line = f"{overlay_dir}/ ({overlays} PNGs of the {misclassified} misclassified patients: best box per slice, class, probability)"
    else:
        overlay_line = "none: no test patient was misclassified"
    return "\n".join([
        f"Results of this run, in {out}:",
        f"  report    {report_dir}/ ({len(report_files)} files: Table 3, errors per location (Fig. 6), ACC per sequence (Fig. 7) "
        "and ROC as JSON, CSV and PNG; patients.csv)",
        f"  figures   {', '.join(figures) if figures else 'none'}",
        f"  overlays  {overlay_line}",
        f"  patients  {out / 'evaluation.csv'} and {out / 'evaluation.json'} (every patient's result)",
        f"  models    {artifacts}/ (what wff serve --artifacts serves)",
        "",
        "Next, try:",
        "  1. serve the trained models (until Ctrl-C):",
        f"     {wff} serve --artifacts {artifacts}",
        "  2. in a second terminal, diagnose one patient and draw its boxes:",
        f"     {wff} diagnose {patient} --overlay {out / 'diagnose-overlays'}",
        "  3. evaluate the test split against that server, with the report and overlays:",
        f"     {wff} evaluate {dataset} --report {out / 'report-served'} --overlay {out / 'overlays-served'}",
    ])


def _wff_command() -> str:
    """How the user started this command: the path of the wff script (relative to the current folder
    when under it), else ``wff``."""
    script = Path(sys.argv[0])
    if script.name != "wff" or not script.is_file():
        return "wff"
    script = script.absolute()
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


# Settings the demo set trains with, before --set: two folds for the fusion weights instead of the paper's four, so
# that the first command ends within 20 minutes on a 2-core machine (BENCHMARKS.md); --size paper uses the profile.
SIZE_OVERRIDES = {"demo": ("train.cv_folds=2",)}


@click.command()
@click.option("--size", type=click.Choice(["tiny", "demo", "paper"]), default="demo", show_default=True,
              help="Synthetic dataset size: demo = 120 training and 60 test patients (2-fold cross-validation of the "
                   "fusion weights); paper = the paper's 445 and 140 (4 folds, as the paper).")
@click.option("--dataset", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Dataset folder (synthesized when it has no labels.csv).  [default: data/SIZE]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Run folder: artifacts, repository, report, overlays.")
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="small", show_default=True,
              help="Training profile.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a profile value (repeatable).")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True, help="Requests in flight during evaluation.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True)
@click.option("--detectors-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset whose detectors are reused (see wff train).")
@click.option("--final-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset whose final models are reused (see wff train).")
@click.option("--force", is_flag=True,
              help="Train, serve and evaluate again even if their outputs exist (deletes --out; the dataset, synthesized "
                   "deterministically or given with --dataset, is kept).")
def demo(size, data_dir, out, profile_name, overrides, concurrency, grpc_port, http_port, metrics_port, detectors_from, final_from,
         force) -> None:
    """Synthesize, train, serve with tritonserver and evaluate the test split over gRPC, then print
    where the report, figures and overlays are and the next commands to try."""
    from wff.client.cli import write_misclassified_overlays
    from wff.client.evaluate import evaluate
    from wff.client.grpc_client import DiagnosisError
    from wff.client.report import format_per_location, format_sequences, write_report
    from wff.ensemble.metrics import format_table
    from wff.records import load_records
    from wff.serving.repository import build_repository
    from wff.serving.server import ServerError, TritonServer
    from wff.training.synth import SIZES, synthesize_dataset
    from wff.training.train import run_training

    data_dir = data_dir or Path("data") / size
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    artifacts, repository, overlay_dir = out / "artifacts", out / "repository", out / "overlays"
    if force:
        shutil.rmtree(out, ignore_errors=True)

    _stage(f"1/4 synthetic dataset ({size}) -> {data_dir}")
    t = time.perf_counter()
    if not (data_dir / "labels.csv").exists():
        n_train, n_test = SIZES[size]
        synthesize_dataset(data_dir, n_train, n_test, seed=0, progress=progress_printer)
    timings["synthesize_s"] = round(time.perf_counter() - t, 1)

    trained = (artifacts / "fusion.json").exists()
    _stage(f"2/4 trained models in {artifacts}: training skipped" if trained else f"2/4 training the {profile_name} profile -> {artifacts}")
    t = time.perf_counter()
    try:
        if not trained:
            profile = apply_overrides(get_profile(profile_name), (*SIZE_OVERRIDES.get(size, ()), *overrides))
            run_training(data_dir, artifacts, profile, progress=progress_printer, detectors_from=detectors_from, final_from=final_from)
        timings["train_s"] = round(time.perf_counter() - t, 1)

        _stage(f"3/4 embedded Triton repository -> {repository}")
        build_repository(repository, "embedded", artifacts=artifacts, overwrite=True)
        records = load_records(data_dir, split="test")
    except (FileNotFoundError, ValueError) as e:
        raise WffError(str(e)) from e

    _stage("4/4 tritonserver + gRPC evaluation of the test split")
    t = time.perf_counter()
    try:
        with TritonServer(repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port) as server:
            click.echo(f"tritonserver ready: gRPC {server.grpc_url}, metrics {server.metrics_url}", err=True)
            with click.progressbar(length=len(records), label=f"diagnosing {len(records)} test patients", file=sys.stderr) as bar:
                result = evaluate(records, url=server.grpc_url, concurrency=concurrency, on_done=lambda _: bar.update(1))
        # decoded here with the trained profile's image settings: no server needed
        overlays, misclassified = write_misclassified_overlays(result, records, overlay_dir, artifacts / "profile.json", {})
    except (ServerError, DiagnosisError) as e:
        raise WffError(str(e)) from e
    result.write_csv(out / "evaluation.csv")
    (out / "evaluation.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    report_files = write_report(result, out / "report")
    timings["serve_and_evaluate_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "demo_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    click.echo(f"Table 3 on the test split, served by tritonserver over gRPC ({len(result.results)} patients, {result.errors} errors):")
    click.echo(format_table(result.table))
    click.echo(f"served strategy {result.settings.served_strategy}, weights {result.settings.served_weights}, "
               f"voting threshold {result.settings.det_threshold:g}, vote threshold {result.settings.vote_threshold():g}")
    click.echo(format_per_location(result.to_dict()["per_location"]))
    click.echo(format_sequences(result.to_dict()["sequences"]))
    click.echo(f"seconds per patient (wall time / patients, concurrency {concurrency}): {result.seconds_per_patient:.3f}")
    click.echo(f"stage timings: {json.dumps(timings)}")
    click.echo("")
    click.echo(format_next_steps(out, data_dir, report_files, overlay_dir, overlays, misclassified, records[0].path, _wff_command()))
    if result.errors:
        raise WffError(f"{result.errors} of {len(result.results)} test patients failed (see {out / 'evaluation.csv'})")

