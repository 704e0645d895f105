"""``wff soak``: a thin click command over soak.py; starts its own server or uses a running one."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import click

from wff.cli import WffError, json_option, write_json
from wff.client.cli import tls_options
from wff.client.grpc_client import DEFAULT_TIMEOUT_S
from wff.serving.cli import SET_HELP, trained_serving


def _patients(dataset: Path | None, split: str | None, patient_dirs: tuple[Path, ...], max_patients: int) -> list:
    from wff.client.grpc_client import read_patient_files
    from wff.records import load_records

    folders = list(patient_dirs)
    if dataset is not None:
        try:
            folders += [r.path for r in load_records(dataset, split)]
        except (FileNotFoundError, ValueError) as e:
            raise WffError(str(e)) from e
    if not folders:
        raise click.UsageError("give good patients: --dataset DIR and/or --patient DIR")
    try:
        return [read_patient_files(f) for f in folders[:max_patients]]
    except FileNotFoundError as e:
        raise WffError(str(e)) from e


@click.command()
@click.option("--url", help="A running tritonserver's gRPC endpoint, host:port (its memory is read from /proc on this machine).")
@click.option("--repository", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Start tritonserver on this model repository.")
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="wff train output: build an embedded repository into a temporary folder and serve it.")
@click.option("--dataset", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Good patients: a dataset with labels.csv.")
@click.option("--split", help="Only this labels.csv split (default: all).")
@click.option("--patient", "patient_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A good patient folder (repeatable).")
@click.option("--max-patients", default=20, show_default=True, type=click.IntRange(min=1), help="Good patients kept in memory.")
@click.option("--minutes", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="How long to send requests after the warm-up (memory growth is judged over these).")
@click.option("--warmup-minutes", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="Full mixed load first, until allocators and shared-memory regions reach their working size.")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(min=1), help="Requests in flight.")
@click.option("--bad-fraction", default=0.3, show_default=True, type=click.FloatRange(0, 1), help="Share of bad requests.")
@click.option("--sample-every", "sample_every_s", default=5.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds between memory samples.")
@click.option("--max-growth-mib", default=64.0, show_default=True, type=click.FloatRange(min=0), help="Allowed memory growth (trend) after the warm-up.")
@click.option("--timeout", "timeout_s", default=DEFAULT_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for each answer.")
@click.option("--seed", default=0, show_default=True, help="Seed of the mix of good and bad requests.")
@click.option("--set", "overrides", multiple=True, metavar="serving.KEY=VALUE", help=SET_HELP)
@tls_options
@json_option("the report (counts, latencies, memory samples)")
def soak(url: str | None, repository: Path | None, artifacts: Path | None, dataset: Path | None, split: str | None,
         patient_dirs: tuple[Path, ...], max_patients: int, minutes: float, warmup_minutes: float, concurrency: int, bad_fraction: float,
         sample_every_s: float, max_growth_mib: float, timeout_s: float, seed: int, overrides: tuple[str, ...], tls: dict, json_out: str | None) -> None:
    """Send good and bad patients at full concurrency for --minutes; exit 1 unless every good one was diagnosed,
    every bad one rejected, the server survived and its memory did not grow beyond --max-growth-mib."""
    from wff.client.grpc_client import DiagnosisError
    from wff.loadtest.soak import MIB, find_server_pid
    from wff.loadtest.soak import soak as run_soak
    from wff.serving.repository import build_repository
    from wff.serving.server import ServerError, TritonServer

    if sum(x is not None for x in (url, repository, artifacts)) != 1:
        raise click.UsageError("give exactly one of --url HOST:PORT, --repository DIR or --artifacts DIR")
    serving = trained_serving(artifacts, overrides)
    patients = _patients(dataset, split, patient_dirs, max_patients)
    settings = dict(duration_s=minutes * 60, warmup_s=warmup_minutes * 60, concurrency=concurrency, bad_fraction=bad_fraction, sample_every_s=sample_every_s,
                    max_growth_bytes=int(max_growth_mib * MIB), seed=seed, timeout_s=timeout_s, tls=tls)
    with tempfile.TemporaryDirectory(prefix="wff-soak-") as tmp:
        try:
            if url is not None:
                pid = find_server_pid(int(url.rsplit(":", 1)[1]))
                if pid is None:
                    click.echo(f"no tritonserver process listening on {url} here: memory is not sampled", err=True)
                report = asyncio.run(run_soak(url, patients, server_pid=pid, **settings))
            else:
                if artifacts is not None:
                    repository = build_repository(Path(tmp) / "repository", "embedded", artifacts, serving=serving)
                with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0) as server:
                    click.echo(f"tritonserver ready (log {server.log_file}, allocator {server.allocator}); soaking for {minutes:g} min", err=True)
                    report = asyncio.run(run_soak(server.grpc_url, patients, server_pid=server.process.pid,
                                                  is_alive=server.is_running, **settings))
                    report.server_allocator = server.allocator
                    if server.stub_restarts:
                        report.failures["backend stub restarts"] = [str(r) for r in server.stub_restarts]
        except (ServerError, DiagnosisError, FileNotFoundError, ValueError) as e:
            raise WffError(str(e)) from e
    if json_out:
        write_json(report.to_dict(), json_out)
    if json_out != "-":
        click.echo(report.summary())
    if not report.passed:
        raise WffError("soak failed: see the counts of its report")
