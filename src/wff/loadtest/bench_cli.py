"""``wff bench``: throughput of the served ensemble, and of the same models without Triton.

    wff bench --artifacts runs/demo/artifacts --dataset data/demo --concurrency 1,2,4,8 --duration 30 \\
        --baseline --flops --json bench.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import click

from wff.cli import WffError, json_option, write_json
from wff.client.grpc_client import DEFAULT_TIMEOUT_S
from wff.loadtest.bench import (
    Budget,
    ServedTarget,
    add_speedups,
    bench_inprocess,
    bench_served,
    check_loopback,
    format_rows,
    format_table4,
    load_patients,
    parse_concurrency,
    table4,
)
from wff.serving.cli import trained_serving

DEFAULT_DURATION_S = 20.0


def machine() -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "command": "wff bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" else None,
    }


def add_flops(rows: list[dict], artifacts: Path, report: dict) -> None:
    """GFLOP per patient of the trained models on the measured patients, GFLOP/s of each row and
    its share of this machine's fp32 GEMM peak."""
    from wff.loadtest.bench_baselines import gemm_peak_gflops, model_flops
    from wff.training.checkpoint import load_classifier, load_detector

    detector, profile = load_detector(artifacts / "detector.pt")
    classifier, _ = load_classifier(artifacts / "classifier.pt")
    counts = model_flops(profile, detector, classifier)
    peak = gemm_peak_gflops(os.cpu_count())
    report["flops"] = {"detector_gflop_per_slice": counts["detector_per_slice"] / 1e9,
                       "classifier_gflop_per_clip": counts["classifier_per_clip"] / 1e9, "gemm_peak": peak}
    for r in rows:
        gflop_s = (counts["detector_per_slice"] * r["slices_per_s"] + counts["classifier_per_clip"] * r["series_per_s"]) / 1e9
        r["gflop_per_patient"] = gflop_s / r["patients_per_s"] if r["patients_per_s"] else None
        r["gflop_per_s"] = gflop_s
        r["gemm_peak_share"] = gflop_s / peak["gflops"]


@click.command()
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A wff train output: start a server on a repository built from it (and run the baselines on it).")
@click.option("--url", default=None, help="gRPC host:port of a running server on this machine, instead of starting one.")
@click.option("--metrics-url", default=None, help="Its metrics endpoint [same host, port 8002].")
@click.option("--server-pid", type=int, default=None, help="Its tritonserver pid, to measure memory (with --url).")
@click.option("--dataset", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="labels.csv + patient folders; patients are cycled.")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="test", show_default=True)
@click.option("--max-patients", "n_patients", type=click.IntRange(1, 1000), default=16, show_default=True,
              help="Patients read into memory and cycled.")
@click.option("--concurrency", default="1,2,4,8", show_default=True, help="Requests in flight, one level after another.")
@click.option("--duration", type=float, default=None, help=f"Seconds per level [{DEFAULT_DURATION_S:g}].")
@click.option("--requests", "n_requests", type=int, default=None, help="Requests per level (instead of --duration).")
@click.option("--baseline", is_flag=True, help="Also run eager PyTorch and in-process ONNX Runtime, one patient at a time (needs spine-wff[train]).")
@click.option("--flops", is_flag=True, help="Add GFLOP per patient and the share of this machine's fp32 GEMM peak; "
              "alone, print the GFLOP per typical patient of every named profile and the peak (needs spine-wff[train]).")
@click.option("--set", "overrides", multiple=True, metavar="serving.KEY=VALUE",
              help="Serve with a changed serving setting (with --artifacts; repeatable).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Seconds to wait for each answer.")
@json_option('the measurements ({"rows": [...], "table4": ..., "machine": ..., "settings": ...})')
def bench(artifacts, url, metrics_url, server_pid, dataset, split, n_patients, concurrency, duration, n_requests,
          baseline, flops, overrides, timeout_s, json_out) -> None:
    """Patients/s, slices/s, latency percentiles, errors, Triton's per-model queue and compute
    time and the server's memory at each concurrency level, then Table 4: time per patient at
    concurrency 1 (p50, p95, mean) beside the throughput at the highest level and the paper's
    times; with --baseline, the same models without Triton."""
    if flops and artifacts is None and url is None and dataset is None:
        table = _profiles_flops()
        if json_out:
            write_json(table, json_out)
        if json_out != "-":
            click.echo(format_profiles_flops(table))
        return
    if artifacts is None and url is None:
        raise click.UsageError("give --artifacts DIR (a server is started) or --url HOST:PORT (a running one)")
    if dataset is None:
        raise click.UsageError("give --dataset DIR (labels.csv and one folder per patient)")
    if (baseline or flops) and artifacts is None:
        raise click.UsageError("--baseline and --flops need --artifacts (the trained checkpoints and ONNX models)")
    if overrides and url is not None:
        raise click.UsageError("--set changes a server started here; it cannot change the one at --url")
    if n_requests is not None and duration is not None:
        raise click.UsageError("give --duration or --requests, not both")
    try:
        levels = parse_concurrency(concurrency)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--concurrency") from e
    budget = Budget(requests=n_requests) if n_requests is not None else Budget(duration_s=duration or DEFAULT_DURATION_S)
    if baseline or flops:
        # torch and the training code ([train]): without them the command fails here, before a server starts
        import wff.loadtest.bench_baselines  # noqa: F401
    if url is not None:
        metrics_url = metrics_url or f"{url.rsplit(':', 1)[0]}:8002"
        for option, endpoint in (("--url", url), ("--metrics-url", metrics_url.removeprefix("http://").split("/")[0])):
            try:
                check_loopback(endpoint)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint=option) from e
    serving = trained_serving(artifacts, overrides)
    try:
        patients = load_patients(dataset, None if split == "all" else split, n_patients)
    except (ValueError, FileNotFoundError) as e:
        raise WffError(str(e)) from e
    click.echo(f"{len(patients)} patients ({sum(p.nbytes for p in patients) / 1e6:.0f} MB), {budget.describe()} per level", err=True)

    report = {"machine": machine(), "settings": {"levels": list(levels), "budget": budget.describe(), "patients": len(patients),
                                                 "split": split, "serving_overrides": list(overrides)}}
    on_row = lambda r: click.echo(f"served concurrency {r['concurrency']}: {r['patients_per_s']:.2f} patients/s, {r['errors']} errors", err=True)  # noqa: E731
    try:
        if url is not None:
            rows = bench_served(ServedTarget(url, metrics_url, server_pid), patients, levels, budget, timeout_s, on_row)
        else:
            rows = _bench_started_server(artifacts, serving, patients, levels, budget, timeout_s, on_row, report)
        if baseline:
            from wff.loadtest.bench_baselines import eager_pytorch_pipeline, onnxruntime_pipeline

            for name, build in (("eager_pytorch", eager_pytorch_pipeline), ("onnxruntime_inprocess", onnxruntime_pipeline)):
                click.echo(f"baseline {name}, one patient at a time ...", err=True)
                rows.append(bench_inprocess(name, build(artifacts).diagnose_files, patients, budget))
        add_speedups(rows)
        if flops:
            add_flops(rows, artifacts, report)
    except Exception as e:
        from wff.client.grpc_client import DiagnosisError
        from wff.serving.server import ServerError

        if isinstance(e, (DiagnosisError, ServerError, FileNotFoundError, ValueError, OSError)):
            raise WffError(str(e)) from e
        raise
    report["table4"] = table4(rows)
    if json_out:
        write_json({"rows": rows, **report}, json_out)
    if json_out == "-":
        return
    click.echo(format_rows(rows))
    click.echo("\n" + format_table4(report["table4"]))
    if flops:
        f = report["flops"]
        click.echo(f"\nGFLOP: detector {f['detector_gflop_per_slice']:.2f}/slice, classifier {f['classifier_gflop_per_clip']:.2f}/clip; "
                   f"fp32 GEMM peak {f['gemm_peak']['gflops']:.1f} GFLOP/s ({f['gemm_peak']['threads']} threads)")
        for r in rows:
            click.echo(f"  {r['pipeline']:<22} c={r['concurrency']}: {r['gflop_per_s']:.1f} GFLOP/s = {100 * r['gemm_peak_share']:.1f} % of peak")


def format_profiles_flops(table: dict) -> str:
    """:func:`_profiles_flops` as text: one line per profile, then this machine's GEMM peak."""
    typical = table["typical_patient"]
    lines = [f"GFLOP per typical patient ({typical['series']} series, {typical['slices']} slices):"]
    for name, p in table["profiles"].items():
        lines.append(f"  {name:<8} {p['image_size']:>4} px  detector {p['detector_gflop_per_slice']:.2f}/slice, "
                     f"classifier {p['classifier_gflop_per_clip']:.2f}/clip, {p['gflop_per_patient']:.1f}/patient")
    peak = table["gemm_peak"]
    lines.append(f"fp32 GEMM peak of this machine: {peak['gflops']:.1f} GFLOP/s ({peak['threads']} threads)")
    return "\n".join(lines)


def _profiles_flops() -> dict:
    """GFLOP per typical patient of each named profile (random-init models), and this machine's GEMM peak."""
    from wff.loadtest.bench_baselines import TYPICAL_PATIENT, gemm_peak_gflops, profile_flops_table
    from wff.config import PROFILES

    table = profile_flops_table(PROFILES)
    return {"machine": machine(), "typical_patient": TYPICAL_PATIENT, "profiles": table,
            "gemm_peak": gemm_peak_gflops(os.cpu_count())}


def _bench_started_server(artifacts, serving, patients, levels, budget, timeout_s, on_row, report) -> list[dict]:
    """Build the embedded repository from ``artifacts``, serve it on free loopback ports, measure."""
    from wff.serving.repository import build_repository
    from wff.serving.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="wff-bench-") as tmp:
        repo = build_repository(Path(tmp) / "repository", "embedded", artifacts, serving=serving)
        with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0) as server:
            report["server"] = {"startup_s": server.startup_s, "repository_serving": json.loads((repo / "preprocess/1/profile.json").read_text())["serving"]}
            target = ServedTarget(server.grpc_url, server.metrics_url, server.process.pid)
            return bench_served(target, patients, levels, budget, timeout_s, on_row)
