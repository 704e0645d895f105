"""Throughput of the served ensemble, measured with a closed-loop gRPC load generator (``wff bench``).

For each concurrency level K, K asyncio workers (tritonclient.grpc.aio) each send one
patient, wait for its diagnosis and send the next, cycling over the loaded patients, until
the budget (a request count or a duration) is spent. A row reports, over that level only:

* patients/s and slices/s (successful diagnoses / wall time; slices = sagittal slices the
  ensemble diagnosed), p50/p95/p99 and mean latency of the successful requests, and the error count;
* Triton's per-model counters as deltas between two reads of the metrics endpoint (requests,
  failures, executions, queue and compute input/infer/output time);
* the peak proportional resident memory (PSS) of the server and its backend stub processes,
  sampled from /proc while the level runs (PSS counts the shared-memory regions once).

The baselines (wff.loadtest.bench_baselines) run the same patients one at a time in this
process and give rows of the same shape. The server must be on this machine (loopback only):
its memory is read from /proc and the load must not cross a network.

:func:`table4` lays the served rows out as the paper's Table 4 reports the model: time per
patient one at a time (concurrency 1: p50, p95, mean), beside the throughput at the highest level
and the paper's own per-patient times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wff.client.metrics import custom_counters, delta, fetch_metrics, per_model, summarise
from wff.contracts import ENSEMBLE_NAME
from wff.processes import process_tree_pss

log = logging.getLogger(__name__)

PIPELINES = ("served", "eager_pytorch", "onnxruntime_inprocess")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_REQUESTS = 100_000  # per level: the budget is always bounded
MAX_DURATION_S = 600.0  # per level
MAX_CONCURRENCY = 64
METRICS_POLL_S = 0.5  # between reads while waiting for Triton's counters to settle
METRICS_SETTLE_S = 15.0  # longest wait for them (Triton refreshes some metrics every 2 s)
MEMORY_SAMPLE_S = 0.25
MIB = 1024 * 1024
# The paper's Table 4, "Avg. time(s)": the time WFF took to diagnose one patient, "between the model
# seeing the images and making the diagnosis result" (Results, "Comparison between WFF and doctors").
# The paper names its hardware only for training (Metrics: Intel E5-2640 CPU, NVIDIA GTX1080Ti GPU).
PAPER_TABLE4_S = {"Det-Seq": 0.850, "Det-Seq-Age": 0.742}


@dataclass(frozen=True)
class BenchPatient:
    """One patient's request, read into memory once. ``index`` stands in for the patient id in logs."""

    index: int
    files: tuple[tuple[str, bytes], ...]
    age: float | None

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.files)


@dataclass(frozen=True)
class Budget:
    """How much one level sends: ``requests`` in all, or for ``duration_s`` seconds (one of the two)."""

    requests: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give a request count or a duration, not both and not neither")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be 1-{MAX_REQUESTS}, got {self.requests}")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] s, got {self.duration_s}")

    def describe(self) -> str:
        return f"{self.requests} requests" if self.requests is not None else f"{self.duration_s:g} s"


class Dispatcher:
    """Hands out request numbers until the budget is spent (shared by the workers of one level)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._numbers = itertools.count()
        self.started = time.perf_counter()

    def next(self) -> int | None:
        if self.budget.duration_s is not None and time.perf_counter() - self.started >= self.budget.duration_s:
            return None
        n = next(self._numbers)
        if self.budget.requests is not None and n >= self.budget.requests:
            return None
        return n


@dataclass(frozen=True)
class Outcome:
    """One request: its latency, the slices and series diagnosed (0 on error) and the error, if any."""

    latency_s: float
    slices: int = 0
    series: int = 0
    error: str | None = None

    @classmethod
    def of(cls, latency_s: float, diagnosis) -> "Outcome":
        return cls(latency_s, len(diagnosis.slice_d), len(diagnosis.series_m))


def percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default) in ms; None without values."""
    if not len(latencies_s):
        return None
    return float(np.percentile(np.asarray(latencies_s, np.float64), q) * 1000.0)


def result_row(pipeline: str, concurrency: int, outcomes: Sequence[Outcome], wall_s: float) -> dict:
    """The measured fields every row has, from one level's outcomes and wall time."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; expected one of {PIPELINES}")
    ok = [o for o in outcomes if o.error is None]
    latencies = [o.latency_s for o in ok]
    rate = (lambda n: n / wall_s) if wall_s > 0 else (lambda n: 0.0)
    return {
        "pipeline": pipeline,
        "concurrency": concurrency,
        "requests": len(outcomes),
        "patients_per_s": rate(len(ok)),
        "slices_per_s": rate(sum(o.slices for o in ok)),
        "series_per_s": rate(sum(o.series for o in ok)),
        "p50_ms": percentile_ms(latencies, 50),
        "p95_ms": percentile_ms(latencies, 95),
        "p99_ms": percentile_ms(latencies, 99),
        "mean_ms": float(np.mean(latencies) * 1000.0) if latencies else None,
        "errors": len(outcomes) - len(ok),
        "wall_s": wall_s,
        "error_examples": sorted({o.error for o in outcomes if o.error})[:3],
    }


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> (1, 2, 4, 8); each level in 1-MAX_CONCURRENCY."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"concurrency {text!r}: expected comma-separated integers such as 1,2,4,8") from None
    if not levels or any(not 1 <= k <= MAX_CONCURRENCY for k in levels):
        raise ValueError(f"concurrency {text!r}: every level must be 1-{MAX_CONCURRENCY}")
    return levels


def check_loopback(url: str) -> None:
    """ValueError unless ``url`` (host:port) names this machine."""
    host = url.rsplit(":", 1)[0].strip("[]") if ":" in url else url
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"{url}: wff bench drives a server on this machine only; use 127.0.0.1:PORT (or start one with --artifacts)")


def load_patients(dataset: str | Path, split: str | None, limit: int) -> list[BenchPatient]:
    """Up to ``limit`` patients of ``split`` (all splits when None) read into memory, in labels.csv order."""
    from wff.client.grpc_client import read_patient_files
    from wff.records import load_records

    records = load_records(dataset, split)
    if not records:
        raise ValueError(f"{dataset}/labels.csv has no patients{f' in split {split!r}' if split else ''}")
    patients = []
    for i, record in enumerate(records[:limit]):
        files = tuple(read_patient_files(record.path))
        patients.append(BenchPatient(i, files, None if math.isnan(record.age) else float(record.age)))
    return patients


# ---------------------------------------------------------------------------------------------
# memory of the server's process tree


class TreeMemory:
    """Samples the summed PSS of a process tree in a thread; ``peak_mib`` after ``stop()``."""

    def __init__(self, pid: int, interval_s: float = MEMORY_SAMPLE_S) -> None:
        if not Path(f"/proc/{pid}").exists():
            raise ValueError(f"no process {pid} on this machine; give the tritonserver pid (or start one with --artifacts)")
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wff-bench-memory", daemon=True)

    def sample(self) -> int:
        total = process_tree_pss(self.pid)
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


# ---------------------------------------------------------------------------------------------
# Triton's counters over a level


def model_deltas(after: Mapping[str, Mapping[str, float]], before: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
    """Per-model summary of the counters' growth between two per_model() snapshots."""
    grown = delta(after, before)
    rows = summarise(grown)
    for model, counters in grown.items():
        rows[model]["executions"] = counters.get("executions", 0.0)
        rows[model]["compute_s"] = sum(counters.get(k, 0.0) for k in ("input_us", "infer_us", "output_us")) / 1e6
        rows[model]["queue_s"] = counters.get("queue_us", 0.0) / 1e6
    return rows


def settled_snapshot(metrics_url: str, before: Mapping[str, Mapping[str, float]], successes: int, failures: int = 0,
                     timeout_s: float = METRICS_SETTLE_S, read: Callable | None = None) -> tuple[dict, list, bool]:
    """Metrics once the ensemble has counted the requests sent since ``before`` and two reads agree.

    Triton counts a request after its response is sent, so the last requests of a level may
    show a moment later. Successes must all be there; failures at least once each (Triton 2.51
    counts a failed ensemble request twice, reason OTHER). Returns (per_model, samples,
    settled); ``settled`` is False when the counts were not reached within ``timeout_s``.
    """
    read = read or fetch_metrics
    deadline = time.monotonic() + timeout_s
    previous = None
    while True:
        samples = read(metrics_url)
        current = per_model(samples)
        e_after, e_before = current.get(ENSEMBLE_NAME, {}), before.get(ENSEMBLE_NAME, {})
        grown = {k: e_after.get(k, 0.0) - e_before.get(k, 0.0) for k in ("success", "failure")}
        if grown["success"] >= successes and grown["failure"] >= failures and current == previous:
            return current, samples, True
        if time.monotonic() > deadline:
            log.warning("Triton counted %s after %.0f s, expected %d successes and %d failures; deltas may be short",
                        grown, timeout_s, successes, failures)
            return current, samples, False
        previous = current
        time.sleep(METRICS_POLL_S)


def counter_deltas(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """Growth of the project's custom counters (diagnoses by class, rejections by reason)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# ---------------------------------------------------------------------------------------------
# the load generator


async def drive(diagnose, patients: Sequence[BenchPatient], concurrency: int, budget: Budget) -> tuple[list[Outcome], float]:
    """``concurrency`` closed-loop workers over ``patients`` (cycled) until ``budget`` is spent.

    ``diagnose(files, age)`` is a coroutine returning a Diagnosis or raising DiagnosisError.
    Returns the outcomes in completion order and the level's wall time.
    """
    from wff.client.grpc_client import DiagnosisError

    if not patients:
        raise ValueError("no patients to send")
    dispatcher = Dispatcher(budget)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while (n := dispatcher.next()) is not None:
            patient = patients[n % len(patients)]
            started = time.perf_counter()
            try:
                dx = await diagnose(patient.files, patient.age)
            except DiagnosisError as e:
                outcomes.append(Outcome(time.perf_counter() - started, error=str(e)))
            else:
                outcomes.append(Outcome.of(time.perf_counter() - started, dx))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - dispatcher.started


@dataclass
class ServedTarget:
    """Where the served ensemble runs: gRPC and metrics URLs, and the server's pid when known."""

    grpc_url: str
    metrics_url: str
    pid: int | None = None


async def bench_served_async(target: ServedTarget, patients: Sequence[BenchPatient], levels: Iterable[int], budget: Budget,
                             timeout_s: float, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    from wff.client.grpc_client import AsyncDiagnosisClient, DiagnosisError

    levels = list(levels)
    rows = []
    # no retries: a request the server sheds counts as an error at its concurrency, not as a slow success
    async with AsyncDiagnosisClient(target.grpc_url, timeout_s=timeout_s, retries=0) as client:
        await client.fusion_settings()  # fails fast when no server answers
        before_samples = fetch_metrics(target.metrics_url)
        warm = patients[: max(levels)] or patients
        warmup = await asyncio.gather(*(client.diagnose(p.files, p.age) for p in warm), return_exceptions=True)
        for p, r in zip(warm, warmup):
            if isinstance(r, DiagnosisError):
                log.info("warm-up request %d failed: %s", p.index, r)
            elif isinstance(r, BaseException):
                raise r
        failed = sum(isinstance(r, BaseException) for r in warmup)
        # every snapshot waits for the requests before it to be counted, so each level's deltas are its own
        before, before_samples, _ = await asyncio.to_thread(
            settled_snapshot, target.metrics_url, per_model(before_samples), len(warm) - failed, failed)
        for k in levels:
            memory = TreeMemory(target.pid) if target.pid else None
            with memory or contextlib.nullcontext():
                outcomes, wall = await drive(client.diagnose, patients, k, budget)
            row = result_row("served", k, outcomes, wall)
            after, after_samples, settled = await asyncio.to_thread(
                settled_snapshot, target.metrics_url, before, row["requests"] - row["errors"], row["errors"])
            row["server_rss_mib"] = memory.peak_mib if memory else None
            row["models"] = model_deltas(after, before)
            row["custom_metrics"] = counter_deltas(custom_counters(after_samples), custom_counters(before_samples))
            row["metrics_settled"] = settled
            before, before_samples = after, after_samples
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def bench_served(target: ServedTarget, patients: Sequence[BenchPatient], levels: Iterable[int], budget: Budget,
                 timeout_s: float = 120.0, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Blocking wrapper of :func:`bench_served_async`."""
    return asyncio.run(bench_served_async(target, patients, levels, budget, timeout_s, on_row))


def bench_inprocess(pipeline: str, diagnose, patients: Sequence[BenchPatient], budget: Budget) -> dict:
    """One patient at a time through ``diagnose(files, age) -> Diagnosis`` in this process (a baseline row).

    Bad input (ValueError, InputError included) counts as an error, as INVALID_ARG does when served.
    """
    if not patients:
        raise ValueError("no patients to send")
    diagnose(patients[0].files, patients[0].age)  # warm-up: first-call allocations, lazy imports
    dispatcher = Dispatcher(budget)
    outcomes = []
    while (n := dispatcher.next()) is not None:
        patient = patients[n % len(patients)]
        started = time.perf_counter()
        try:
            dx = diagnose(patient.files, patient.age)
        except ValueError as e:
            outcomes.append(Outcome(time.perf_counter() - started, error=str(e)))
        else:
            outcomes.append(Outcome.of(time.perf_counter() - started, dx))
    return result_row(pipeline, 1, outcomes, time.perf_counter() - dispatcher.started)


def add_speedups(rows: list[dict]) -> None:
    """Each baseline row gets ``served_speedup``: the best served patients/s over its own."""
    served = [r["patients_per_s"] for r in rows if r["pipeline"] == "served"]
    best = max(served) if served else None
    for r in rows:
        if r["pipeline"] != "served":
            r["served_speedup"] = best / r["patients_per_s"] if best and r["patients_per_s"] > 0 else None


def table4(rows: Sequence[dict]) -> dict | None:
    """Table 4's view of the served rows; None without any.

    "per_patient": the latency of one patient at a time (the served row at concurrency 1) as
    p50_s, p95_s, mean_s over its ``diagnosed`` requests, or None when 1 was not among the levels;
    "throughput": patients_per_s at the highest level measured and its inverse, seconds per
    patient; "paper_avg_time_s": the paper's Table 4 (PAPER_TABLE4_S).
    """
    served = [r for r in rows if r["pipeline"] == "served"]
    if not served:
        return None
    one = next((r for r in served if r["concurrency"] == 1), None)
    top = max(served, key=lambda r: r["concurrency"])
    seconds = lambda ms: None if ms is None else ms / 1000.0  # noqa: E731
    per_patient = None if one is None else {
        "concurrency": 1, "diagnosed": one["requests"] - one["errors"],
        "p50_s": seconds(one["p50_ms"]), "p95_s": seconds(one["p95_ms"]), "mean_s": seconds(one.get("mean_ms")),
    }
    rate = top["patients_per_s"]
    return {
        "per_patient": per_patient,
        "throughput": {"concurrency": top["concurrency"], "patients_per_s": rate, "seconds_per_patient": 1.0 / rate if rate > 0 else None},
        "paper_avg_time_s": dict(PAPER_TABLE4_S),
    }


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table4(t4: Mapping | None) -> str:
    """:func:`table4` as text."""
    if t4 is None:
        return "Table 4: no served rows"
    lines = ["Table 4, time per patient of the served ensemble (s):"]
    one = t4["per_patient"]
    if one is None:
        lines.append("  one patient at a time: not measured; include 1 in --concurrency")
    else:
        lines.append(f"  one patient at a time (concurrency 1, {one['diagnosed']} diagnosed): p50 {_num(one['p50_s'], '.3f')}, "
                     f"p95 {_num(one['p95_s'], '.3f')}, mean {_num(one['mean_s'], '.3f')}")
    tp = t4["throughput"]
    lines.append(f"  throughput at concurrency {tp['concurrency']}: {tp['patients_per_s']:.2f} patients/s "
                 f"({_num(tp['seconds_per_patient'], '.3f')} s per patient)")
    paper = ", ".join(f"{name} {s:.3f}" for name, s in t4["paper_avg_time_s"].items())
    lines.append(f"  paper, Table 4 Avg. time: {paper} (one patient, its own hardware)")
    return "\n".join(lines)


def format_rows(rows: Sequence[dict]) -> str:
    """The rows as a table, then per served row where the time went per model."""
    head = f"{'pipeline':<22}{'conc':>5}{'req':>6}{'pat/s':>8}{'slices/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'err':>5}{'PSS MiB':>9}{'x served':>9}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['pipeline']:<22}{r['concurrency']:>5}{r['requests']:>6}{r['patients_per_s']:>8.2f}{r['slices_per_s']:>9.1f}"
            f"{_num(r['p50_ms'], '.0f'):>9}{_num(r['p95_ms'], '.0f'):>9}{_num(r['p99_ms'], '.0f'):>9}{r['errors']:>5}"
            f"{_num(r.get('server_rss_mib'), '.0f'):>9}{_num(r.get('served_speedup'), '.2f'):>9}"
        )
    for r in rows:
        if r["pipeline"] != "served" or not r.get("models"):
            continue
        lines.append(f"\nserved, concurrency {r['concurrency']}: per model over the level (means per request, ms)")
        lines.append(f"  {'model':<15}{'req':>6}{'fail':>6}{'batch':>7}{'queue':>9}{'input':>9}{'infer':>9}{'output':>9}{'busy s':>8}")
        for model, m in r["models"].items():
            lines.append(
                f"  {model:<15}{m['requests']:>6.0f}{m['failures']:>6.0f}{m['mean_batch']:>7.1f}{m['queue_ms']:>9.1f}"
                f"{m['compute_input_ms']:>9.1f}{m['compute_infer_ms']:>9.1f}{m['compute_output_ms']:>9.1f}{m['compute_s']:>8.1f}"
            )
        for k, v in r.get("custom_metrics", {}).items():
            lines.append(f"  {k}: {v:g}")
    return "\n".join(lines)
