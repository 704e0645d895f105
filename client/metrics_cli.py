"""``wff metrics``: a readable per-model summary of a running server's Triton metrics."""

from __future__ import annotations

import urllib.error

import click

from wff.cli import WffError, json_option, write_json
from wff.client.metrics import custom_counters, fetch_metrics, format_gauges, format_summary, per_model, process_gauges, summarise


@click.command()
@click.option("--url", default="localhost:8002", show_default=True,
              help="tritonserver's metrics endpoint, host:port (not the gRPC one: wff serve prints both).")
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for each answer of the endpoint.")
@json_option("the summary (models, process, custom counters)")
def metrics(url: str, timeout_s: float, json_out: str | None) -> None:
    """Requests, failures by reason, batch sizes, queue and compute time per model; CPU and memory;
    the project's own counters (diagnoses by class, rejected inputs by reason)."""
    try:
        samples = fetch_metrics(url, timeout_s)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise WffError(f"cannot read metrics from {url}: {e}; is `wff serve` running, and is {url} its metrics endpoint (port 8002 by default)?") from e
    rows = summarise(per_model(samples))
    gauges, custom = process_gauges(samples), custom_counters(samples)
    if json_out:
        write_json({"models": rows, "process": gauges, "custom": custom}, json_out)
    if json_out == "-":
        return
    click.echo(format_summary(rows))
    for line in format_gauges(gauges):
        click.echo(line)
    for k, v in custom.items():
        click.echo(f"{k}: {v:g}")
