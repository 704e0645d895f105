"""Soak test: good and bad patients at full concurrency for a fixed time, server memory sampled.

    report = asyncio.run(soak(url, patients, duration_s=600, concurrency=8, server_pid=pid))
    report.passed, report.to_dict()

``concurrency`` workers send requests back to back until the time is up. Each request is a
good patient (one of ``patients``) or, with probability ``bad_fraction``, one of the bad
variants of :func:`bad_variants` (non-DICOM bytes, a truncated file, a file without pixels,
a second patient's file, only axial images, a NaN or impossible age). Every outcome is
counted: a good request must be diagnosed, a bad one rejected with INVALID_ARGUMENT.

The server's memory (tritonserver plus its backend stubs, proportional set size from /proc:
each shared page counted once, so the Python backend's shared-memory regions, mapped by the
server and by a stub each, are not counted twice) is sampled at launch, every
``sample_every_s`` and at the end. The first ``warmup_s`` are the same mixed load at full
concurrency, unscored for memory: the allocators and the shared-memory regions grow to what
this load needs (fast in the first minutes; BENCHMARKS.md has the measured runs). Growth is the least-squares
trend of the samples after the warm-up times their time span, so a leak shows as a steady
climb and one sample's spike does not decide it. The soak passes when no good request
failed, every bad one was rejected, the server still runs and growth is within
``max_growth_bytes``.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from wff.client.grpc_client import AsyncDiagnosisClient, DiagnosisError, RejectedInput
from wff.processes import listening_sockets, process_name, process_tree_pss

Files = list[tuple[str, bytes]]
MIB = 1024 * 1024
DEFAULT_MAX_GROWTH_BYTES = 64 * MIB
MESSAGES_KEPT = 5  # distinct error messages kept per outcome kind


@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    good_sent: int = 0
    good_ok: int = 0
    good_failed: int = 0
    bad_sent: int = 0
    bad_rejected: int = 0
    bad_accepted: int = 0  # a bad request that got a diagnosis
    bad_other_error: int = 0  # a bad request that failed with something else than INVALID_ARGUMENT
    bad_by_kind: dict = field(default_factory=dict)  # kind -> requests sent
    latency_good_s: dict = field(default_factory=dict)  # mean, p50, p95, max
    failures: dict = field(default_factory=dict)  # outcome kind -> first distinct messages
    warmup_s: float = 0.0  # full load before the memory baseline (its requests are counted too)
    memory_launch_bytes: int | None = None  # PSS of tritonserver + stubs
    memory_start_bytes: int | None = None  # first sample after the warm-up
    memory_end_bytes: int | None = None
    memory_max_bytes: int | None = None  # after the warm-up
    memory_growth_bytes: int | None = None  # trend after the warm-up (see the module doc)
    memory_samples: list = field(default_factory=list)  # [seconds since the load started, bytes]
    max_growth_bytes: int = DEFAULT_MAX_GROWTH_BYTES
    server_alive: bool = True
    server_allocator: str | None = None  # library preloaded into tritonserver ("glibc": none), when this soak started it

    @property
    def passed(self) -> bool:
        growth_ok = self.memory_growth_bytes is None or self.memory_growth_bytes <= self.max_growth_bytes
        return (self.good_failed == 0 and self.bad_accepted == 0 and self.bad_other_error == 0
                and self.server_alive and growth_ok and self.good_ok > 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        def mib(v):
            return "n/a" if v is None else f"{v / MIB:.1f} MiB"

        lat = self.latency_good_s
        lines = [
            f"soak {self.duration_s:.0f} s (after {self.warmup_s:.0f} s of warm-up) at concurrency {self.concurrency}: "
            f"{'PASSED' if self.passed else 'FAILED'}",
            f"  good requests {self.good_sent}: {self.good_ok} diagnosed, {self.good_failed} failed"
            + (f"; latency mean {lat['mean']:.3f} s, p95 {lat['p95']:.3f} s, max {lat['max']:.3f} s" if lat else ""),
            f"  bad requests {self.bad_sent}: {self.bad_rejected} rejected (INVALID_ARGUMENT), "
            f"{self.bad_accepted} accepted, {self.bad_other_error} other errors",
            f"  server PSS (tritonserver + stubs): launch {mib(self.memory_launch_bytes)}, after warm-up {mib(self.memory_start_bytes)}, "
            f"end {mib(self.memory_end_bytes)}, max {mib(self.memory_max_bytes)}, trend growth {mib(self.memory_growth_bytes)} "
            f"(limit {mib(self.max_growth_bytes)}); server {'running' if self.server_alive else 'GONE'}"
            + (f"; allocator {self.server_allocator}" if self.server_allocator else ""),
        ]
        for kind, messages in self.failures.items():
            lines += [f"  {kind}: {m}" for m in messages]
        return "\n".join(lines)


def rewrite_dicom(data: bytes, change) -> bytes:
    """Part 10 bytes with ``change(ds)`` applied to the dataset (for bad-input variants)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def drop_pixels(ds) -> None:
    del ds.PixelData


def other_patient(ds) -> None:
    ds.PatientID = f"{ds.get('PatientID', '')}-other"


def _axial(ds) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]


def bad_variants(files: Files) -> dict[str, tuple[Files, float | None]]:
    """Bad requests made from one good patient: kind -> (files, age). Each must be rejected."""
    k = len(files) // 2
    name, data = files[k]

    def replaced(new: bytes) -> Files:
        return files[:k] + [(name, new)] + files[k + 1:]

    return {
        "non_dicom": (replaced(b"not a DICOM file at all " * 16), None),
        "truncated": (replaced(data[: len(data) // 2]), None),
        "no_pixels": (replaced(rewrite_dicom(data, drop_pixels)), None),
        "two_patients": (replaced(rewrite_dicom(data, other_patient)), None),
        "no_sagittal": ([(n, rewrite_dicom(d, _axial)) for n, d in files], None),
        "age_nan": (files, float("nan")),
        "age_out_of_range": (files, 500.0),
    }


def find_server_pid(port: int) -> int | None:
    """The tritonserver process listening on ``port`` on this machine, from /proc; None if none."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or process_name(int(entry.name)) != "tritonserver":
            continue
        try:
            if any(p == port for _, p in listening_sockets(int(entry.name))):
                return int(entry.name)
        except OSError:  # not ours to read, or gone
            continue
    return None


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def q(f):
        return round(ordered[min(len(ordered) - 1, int(f * len(ordered)))], 4)

    return {"mean": round(sum(ordered) / len(ordered), 4), "p50": q(0.5), "p95": q(0.95), "max": round(ordered[-1], 4)}


def trend_growth(samples: Sequence[tuple[float, int]]) -> int | None:
    """Least-squares slope of bytes over seconds times the samples' time span; None below 3 samples."""
    if len(samples) < 3:
        return None
    t = np.array([s for s, _ in samples], np.float64)
    b = np.array([v for _, v in samples], np.float64)
    if np.ptp(t) == 0:
        return None
    slope = np.polyfit(t - t.mean(), b, 1)[0]
    return int(slope * np.ptp(t))


async def soak(
    url: str,
    patients: Sequence[Files],
    duration_s: float,
    concurrency: int = 8,
    bad_fraction: float = 0.3,
    server_pid: int | None = None,
    sample_every_s: float = 5.0,
    warmup_s: float = 0.0,
    max_growth_bytes: int = DEFAULT_MAX_GROWTH_BYTES,
    seed: int = 0,
    timeout_s: float = 120.0,
    tls: dict | None = None,
    is_alive=None,
) -> SoakReport:
    """Run the soak against the gRPC endpoint ``url``; ``server_pid`` is the tritonserver process to sample;
    ``tls`` holds AsyncDiagnosisClient's ssl / tls_ca / tls_cert / tls_key."""
    if not patients:
        raise ValueError("the soak needs at least one good patient")
    if not 0 <= bad_fraction <= 1:
        raise ValueError(f"bad_fraction {bad_fraction} is not in [0, 1]")
    rng = random.Random(seed)
    bad = [(kind, *request) for files in patients[:3] for kind, request in bad_variants(files).items()]
    report = SoakReport(duration_s=duration_s, concurrency=concurrency, warmup_s=warmup_s, max_growth_bytes=max_growth_bytes)
    failures: dict[str, Counter] = {}
    latencies: list[float] = []
    sample = (lambda: process_tree_pss(server_pid)) if server_pid else (lambda: None)
    report.memory_launch_bytes = sample()

    def failed(kind: str, e: Exception) -> None:
        failures.setdefault(kind, Counter())[str(e)[:300]] += 1

    # no retries: a good request that fails once is a failure of the soak, not hidden by a second attempt
    async with AsyncDiagnosisClient(url, timeout_s=timeout_s, retries=0, **(tls or {})) as client:
        await asyncio.gather(*(client.diagnose(files) for files in patients for _ in range(min(concurrency, 2))))
        started = time.monotonic()
        deadline = started + warmup_s + duration_s
        samples: list[tuple[float, int]] = []

        async def sampler():
            while time.monotonic() < deadline:
                value = sample()
                if value:
                    samples.append((round(time.monotonic() - started, 1), value))
                await asyncio.sleep(sample_every_s)

        async def worker():
            while time.monotonic() < deadline:
                if rng.random() < bad_fraction:
                    kind, files, age = rng.choice(bad)
                    report.bad_sent += 1
                    report.bad_by_kind[kind] = report.bad_by_kind.get(kind, 0) + 1
                    try:
                        await client.diagnose(files, age)
                        report.bad_accepted += 1
                        failures.setdefault("bad accepted", Counter())[kind] += 1
                    except RejectedInput:
                        report.bad_rejected += 1
                    except DiagnosisError as e:
                        report.bad_other_error += 1
                        failed(f"bad {kind}, other error", e)
                else:
                    files = rng.choice(patients)
                    report.good_sent += 1
                    sent = time.monotonic()
                    try:
                        await client.diagnose(files)
                        report.good_ok += 1
                        latencies.append(time.monotonic() - sent)
                    except DiagnosisError as e:
                        report.good_failed += 1
                        failed("good failed", e)

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    end = sample()
    if end:
        samples.append((round(time.monotonic() - started, 1), end))
    scored = [s for s in samples if s[0] >= warmup_s]
    report.memory_start_bytes = scored[0][1] if scored else None
    report.memory_end_bytes = end
    report.memory_samples = [list(s) for s in samples]
    report.memory_max_bytes = max((b for _, b in scored), default=None)
    report.memory_growth_bytes = trend_growth(scored)
    report.latency_good_s = _quantiles(latencies)
    report.failures = {kind: list(c)[:MESSAGES_KEPT] for kind, c in failures.items()}
    report.server_alive = bool(is_alive()) if is_alive else (server_pid is None or Path(f"/proc/{server_pid}").exists())
    return report
