"""``wff demo``: the whole job end to end, on the embedded CPU default.

synthesize a DICOM dataset -> train (small profile, k-fold CV of the fusion weights) -> export
ONNX -> build the embedded Triton repository -> start the real tritonserver -> evaluate the
test split over gRPC -> print Table 3, the per-location and per-sequence tables and write
the report (JSON, CSV, PNG) -> stop the server. Each stage is skipped when its output
is already there (``--fresh`` redoes everything).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import click

from wff.config import PROFILES, get_profile
from wff.training.cli import apply_overrides, progress_printer


def _stage(name: str) -> None:
    click.echo(click.style(f"== {name}", bold=True), err=True)


@click.command()
@click.option("--size", type=click.Choice(["tiny", "demo", "paper"]), default="paper", show_default=True,
              help="Synthetic dataset size: paper = the paper's 445 training and 140 test patients.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Dataset folder (synthesized when it has no labels.csv).  [default: data/SIZE]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="small", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a profile value.")
@click.option("--concurrency", type=int, default=4, show_default=True, help="Requests in flight during evaluation.")
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--detectors-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset whose detectors are reused (see wff train).")
@click.option("--final-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Artifacts of an earlier run on the same dataset whose final models are reused (see wff train).")
@click.option("--fresh", is_flag=True, help="Redo every stage even if its output exists.")
def demo(size, data_dir, out, profile_name, overrides, concurrency, grpc_port, http_port, metrics_port, detectors_from, final_from,
         fresh) -> None:
    """Synthesize, train, serve with tritonserver and evaluate the test split over gRPC."""
    from wff.client.evaluate import evaluate
    from wff.client.report import format_per_location, format_sequences, write_report
    from wff.ensemble.metrics import format_table
    from wff.serving.repository import build_repository
    from wff.training.dataset import load_records
    from wff.serving.server import TritonServer
    from wff.training.synth import SIZES, synthesize_dataset
    from wff.training.train import run_training

    data_dir = data_dir or Path("data") / size
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    artifacts, repository = out / "artifacts", out / "repository"
    if fresh:
        for path in (data_dir, out):
            shutil.rmtree(path, ignore_errors=True)

    _stage(f"1/4 synthetic dataset ({size}) -> {data_dir}")
    t = time.perf_counter()
    if not (data_dir / "labels.csv").exists():
        n_train, n_test = SIZES[size]
        synthesize_dataset(data_dir, n_train, n_test, seed=0, progress=progress_printer)
    timings["synthesize_s"] = round(time.perf_counter() - t, 1)

    _stage(f"2/4 training the {profile_name} profile -> {artifacts}")
    t = time.perf_counter()
    if not (artifacts / "fusion.json").exists():
        profile = apply_overrides(get_profile(profile_name), overrides)
        run_training(data_dir, artifacts, profile, progress=progress_printer, detectors_from=detectors_from, final_from=final_from)
    timings["train_s"] = round(time.perf_counter() - t, 1)

    _stage(f"3/4 embedded Triton repository -> {repository}")
    build_repository(repository, "embedded", artifacts=artifacts, overwrite=True)

    _stage("4/4 tritonserver + gRPC evaluation of the test split")
    t = time.perf_counter()
    with TritonServer(repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port) as server:
        click.echo(f"tritonserver ready: gRPC {server.grpc_url}, metrics {server.metrics_url}", err=True)
        records = load_records(data_dir, split="test")
        with click.progressbar(length=len(records), label=f"diagnosing {len(records)} test patients", file=sys.stderr) as bar:
            result = evaluate(records, url=server.grpc_url, concurrency=concurrency, on_done=lambda _: bar.update(1))
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
    click.echo(f"report (Table 3, Fig. 6, Fig. 7, ROC as JSON, CSV and PNG): {out / 'report'} ({len(report_files)} files)")
    click.echo(f"seconds per patient (wall time / patients, concurrency {concurrency}): {result.seconds_per_patient:.3f}")
    click.echo(f"stage timings: {json.dumps(timings)}")
