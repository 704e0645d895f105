"""``wff metrics``: a readable per-model summary of a running server's Triton metrics."""

from __future__ import annotations

import json
import sys
import urllib.error

import click

from wff.client.metrics import custom_counters, fetch_metrics, format_gauges, format_summary, per_model, process_gauges, summarise


@click.command()
@click.option("--url", default="localhost:8002", show_default=True, help="Metrics endpoint host:port.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON instead of a table.")
def metrics(url: str, json_out: bool) -> None:
    """Requests, failures by reason, batch sizes, queue and compute time per model; CPU and memory;
    the project's own counters (diagnoses by class, rejected inputs by reason)."""
    try:
        samples = fetch_metrics(url)
    except (urllib.error.URLError, OSError) as e:
        click.echo(f"error: cannot read metrics from {url}: {e}; is `wff serve` running?", err=True)
        sys.exit(1)
    rows = summarise(per_model(samples))
    gauges, custom = process_gauges(samples), custom_counters(samples)
    if json_out:
        click.echo(json.dumps({"models": rows, "process": gauges, "custom": custom}, indent=2))
        return
    click.echo(format_summary(rows))
    for line in format_gauges(gauges):
        click.echo(line)
    for k, v in custom.items():
        click.echo(f"{k}: {v:g}")
