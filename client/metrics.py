"""Triton's Prometheus metrics, parsed and summarised per model (``wff metrics``).

Only the text exposition format Triton writes is handled: ``name{label="v",...} value``
lines and ``#`` comments. Times in Triton's counters are cumulative microseconds; the
summary divides them by the request (or execution) counts.

Two habits of Triton 2.51 to read them by: a Python-backend step that answers a request with
an error still counts it as a success (the step ran), and a failed ensemble request counts
twice in ``nv_inference_request_failure{reason="OTHER"}``. Rejected inputs by reason are
therefore counted by the steps themselves, in ``wff_rejected_inputs_total`` (see
wff.serving.custom_metrics).
"""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str, default: str = "") -> str:
        return dict(self.labels).get(key, default)


def parse_metrics(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition; malformed lines raise ValueError with the line number."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"metrics line {number} is not in Prometheus text format: {line[:80]!r}")
        labels = tuple(sorted(_LABEL.findall(match.group("labels") or "")))
        samples.append(Sample(match.group("name"), labels, float(match.group("value"))))
    return samples


def fetch_metrics(url: str, timeout_s: float = 5.0) -> list[Sample]:
    """GET the metrics endpoint (``http://host:8002/metrics`` or ``host:8002``)."""
    if not url.startswith("http"):
        url = f"http://{url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (operator-given URL)
        return parse_metrics(response.read().decode())


MODEL_COUNTERS = {
    "success": "nv_inference_request_success",
    "failure": "nv_inference_request_failure",
    "inferences": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "input_us": "nv_inference_compute_input_duration_us",
    "infer_us": "nv_inference_compute_infer_duration_us",
    "output_us": "nv_inference_compute_output_duration_us",
}


def per_model(samples: Iterable[Sample]) -> dict[str, dict[str, float]]:
    """{model: {counter: value}} summed over versions; failures also split by reason."""
    wanted = {v: k for k, v in MODEL_COUNTERS.items()}
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        key = wanted.get(s.name)
        model = s.label("model")
        if key is None or not model:
            continue
        table[model][key] += s.value
        if key == "failure" and s.label("reason"):
            table[model][f"failure[{s.label('reason')}]"] += s.value
    return {m: dict(v) for m, v in table.items()}


def delta(after: Mapping[str, Mapping[str, float]], before: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Counter differences between two per_model() snapshots (a run's own share)."""
    return {m: {k: v - before.get(m, {}).get(k, 0.0) for k, v in c.items()} for m, c in after.items()}


def summarise(counters: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Requests, failures, mean batch and mean queue / compute times (ms) per model."""
    rows = {}
    for model, c in sorted(counters.items()):
        requests = c.get("success", 0.0) + c.get("failure", 0.0)
        per_req = max(c.get("success", 0.0), 1.0)
        execs = max(c.get("executions", 0.0), 1.0)
        rows[model] = {
            "requests": requests,
            "success": c.get("success", 0.0),
            "failures": c.get("failure", 0.0),
            "mean_batch": c.get("inferences", 0.0) / execs,
            "request_ms": c.get("request_us", 0.0) / per_req / 1000,
            "queue_ms": c.get("queue_us", 0.0) / per_req / 1000,
            "compute_input_ms": c.get("input_us", 0.0) / per_req / 1000,
            "compute_infer_ms": c.get("infer_us", 0.0) / per_req / 1000,
            "compute_output_ms": c.get("output_us", 0.0) / per_req / 1000,
            **{k: v for k, v in c.items() if k.startswith("failure[")},
        }
    return rows


def process_gauges(samples: Iterable[Sample]) -> dict[str, float]:
    """Server-wide CPU and memory gauges, where Triton reports them."""
    names = {"nv_cpu_utilization": "cpu_utilization", "nv_cpu_memory_used_bytes": "cpu_memory_used_bytes",
             "nv_cpu_memory_total_bytes": "cpu_memory_total_bytes"}
    return {names[s.name]: s.value for s in samples if s.name in names}


def custom_counters(samples: Iterable[Sample], prefix: str = "wff_") -> dict[str, float]:
    """The project's own Python-backend metrics (names starting with ``wff_``), by label set."""
    out = {}
    for s in samples:
        if s.name.startswith(prefix):
            labels = ",".join(f"{k}={v}" for k, v in s.labels if k != "version")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def format_summary(rows: Mapping[str, Mapping[str, float]]) -> str:
    """One line per model: requests, failures, mean batch, then mean ms per request in the queue,
    in compute (input, infer, output) and in all."""
    head = f"{'model':<16}{'requests':>9}{'failed':>8}{'batch':>7}{'queue ms':>10}{'input ms':>10}{'infer ms':>10}{'output ms':>10}{'total ms':>10}"
    lines = [head]
    for model, r in rows.items():
        lines.append(
            f"{model:<16}{r['requests']:>9.0f}{r['failures']:>8.0f}{r['mean_batch']:>7.1f}{r['queue_ms']:>10.2f}"
            f"{r['compute_input_ms']:>10.2f}{r['compute_infer_ms']:>10.2f}{r['compute_output_ms']:>10.2f}{r['request_ms']:>10.2f}"
        )
        for k, v in r.items():
            if k.startswith("failure[") and v:
                lines.append(f"{'':<16}  {k}: {v:.0f}")
    return "\n".join(lines)


def format_gauges(gauges: Mapping[str, float]) -> list[str]:
    """Triton's CPU and memory gauges (the whole machine's, not the server's alone) as lines."""
    lines = []
    if "cpu_utilization" in gauges:
        lines.append(f"CPU utilisation (machine): {100 * gauges['cpu_utilization']:.0f} %")
    if "cpu_memory_used_bytes" in gauges and "cpu_memory_total_bytes" in gauges:
        lines.append(f"memory used (machine): {gauges['cpu_memory_used_bytes'] / 2**30:.1f} of {gauges['cpu_memory_total_bytes'] / 2**30:.1f} GiB")
    return lines
