"""Diagnose a dataset split over gRPC and score the six fusion strategies of Table 3.

Every patient is sent once, with up to ``concurrency`` requests in flight. The server returns
the fusion components (D per slice, M per series, A), so every strategy's decision is
recomputed here with ``wff.ensemble.fusion`` and the weights from the fusion model's config
parameters: no second inference. Table 3 also has the row "Det-Seq-Age (paper λ)": the same
components fused at the paper's weights 0.45/0.45/0.1 (wff.ensemble.metrics.table3). Malignant is the positive class. Beyond Table 3 the
evaluation gives the error per vertebral location (Fig. 6), the metrics per sequence subset
(Fig. 7) and the ROC curves (wff.ensemble.report_metrics); wff.client.report writes them.

A patient whose request fails (rejected input, overloaded or absent server, or an unexpected
exception while reading its files or parsing the answer) gets a result with its error and the
reason's group (:func:`failure_reason`) instead of a diagnosis; the other patients are not
affected. Every metric is computed over the diagnosed patients.

Dataset layout: ``DATASET/labels.csv`` (patient_id,label,age,location,split; location one or
more vertebral locations joined by ';') and one folder ``DATASET/<patient_id>/`` of DICOM files
per patient (wff.records).
"""

from __future__ import annotations

import asyncio
import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wff.client.grpc_client import AsyncDiagnosisClient, DiagnosisError, read_patient_files
from wff.config import LABELS
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import Components, FusionSettings
from wff.ensemble.metrics import table3
from wff.ensemble.report_metrics import location_table, sequence_table
from wff.ensemble.types import PatientRecord

log = logging.getLogger(__name__)

METRICS = ("acc", "auc", "se", "sp")
CSV_FIELDS = ("patient_id", "label", "predicted_label", "p_malignant", "n_series", "seconds", "error")


def failure_reason(e: Exception) -> str:
    """The group of a patient's failure in summaries: the DiagnosisError's reason, or the exception type."""
    if isinstance(e, DiagnosisError):
        return e.reason
    if isinstance(e, FileNotFoundError):
        return "no files to send"
    return f"unexpected {type(e).__name__}"


def json_number(v: float | None) -> float | None:
    """JSON value of a metric: None for NaN (undefined), else rounded to 6 decimals."""
    return None if v is None or math.isnan(v) else round(float(v), 6)


@dataclass
class PatientResult:
    patient_id: str
    label: int  # 0 benign, 1 malignant
    seconds: float  # request time, file reading included
    diagnosis: Diagnosis | None = None
    error: str | None = None  # why no diagnosis came back
    locations: tuple[str, ...] = ()  # vertebral locations from labels.csv (config.LOCATIONS), main one first
    reason: str = ""  # the error's group (failure_reason), e.g. "input rejected by the server"

    @property
    def series_sequences(self) -> list[str]:
        """The sequence of each served series (SERIES_INFO), e.g. ["T1", "T2", "STIR"]."""
        return [info.get("sequence", "") for info in self.diagnosis.series_info] if self.diagnosis else []

    def csv_row(self) -> dict:
        dx = self.diagnosis
        return {
            "patient_id": self.patient_id,
            "label": LABELS[self.label],
            "predicted_label": dx.label if dx else "",
            "p_malignant": f"{dx.p_malignant:.6f}" if dx else "",
            "n_series": len(dx.series_m) if dx else "",
            "seconds": f"{self.seconds:.3f}",
            "error": self.error or "",
        }


@dataclass
class Evaluation:
    results: list[PatientResult]
    settings: FusionSettings
    wall_s: float
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # strategy (and paper-λ row) -> acc, auc, se, sp

    @property
    def errors(self) -> int:
        return sum(r.diagnosis is None for r in self.results)

    @property
    def seconds_per_patient(self) -> float:
        return self.wall_s / len(self.results) if self.results else math.nan

    def failures(self) -> dict[str, list[str]]:
        """{reason: patient ids} of the patients without a diagnosis, most frequent reason first."""
        groups: dict[str, list[str]] = {}
        for r in self.results:
            if r.diagnosis is None:
                groups.setdefault(r.reason or "unknown", []).append(r.patient_id)
        return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))

    @property
    def diagnosed(self) -> list[PatientResult]:
        """The patients that got a diagnosis: every metric is computed over these."""
        return [r for r in self.results if r.diagnosis is not None]

    def components(self) -> list[Components]:
        return [r.diagnosis.components() for r in self.diagnosed]

    def per_location(self) -> dict[str, dict[str, dict]]:
        """Fig. 6: {strategy: {location: patients, wrong, error_rate}} over the diagnosed patients,
        a patient with several locations counted at each (wff.ensemble.report_metrics.location_errors)."""
        done = self.diagnosed
        return location_table(self.components(), [r.label for r in done], [r.locations for r in done], self.settings)

    def sequences(self) -> dict[str, dict]:
        """Fig. 7: {subset: sequences, patients, left_out, strategies} (wff.ensemble.report_metrics.sequence_table)."""
        done = self.diagnosed
        return sequence_table(self.components(), [r.series_sequences for r in done], [r.label for r in done], self.settings)

    def to_dict(self) -> dict:
        """Table 3, timing and counts, plus "per_location" (Fig. 6) and "sequences" (Fig. 7), JSON-ready."""
        return {
            "strategies": {name: {k: json_number(m[k]) for k in METRICS} for name, m in self.table.items()},
            "seconds_per_patient": json_number(self.seconds_per_patient),
            "patients": len(self.results),
            "errors": self.errors,
            "failures": self.failures(),
            "served_strategy": self.settings.served_strategy,
            # what made the decisions: weights, vote and voting thresholds (not the CV report)
            "fusion": self.settings.to_dict(cv=False),
            "per_location": {
                name: {loc: {**row, "error_rate": json_number(row["error_rate"])} for loc, row in rows.items()}
                for name, rows in self.per_location().items()
            },
            "sequences": {
                name: {**entry, "strategies": {s: {k: json_number(m[k]) for k in METRICS} for s, m in entry["strategies"].items()}}
                for name, entry in self.sequences().items()
            },
        }

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(r.csv_row() for r in self.results)


async def diagnose_records(
    client: AsyncDiagnosisClient,
    records: Sequence[PatientRecord],
    concurrency: int,
    on_done: Callable[[PatientResult], None] | None = None,
) -> list[PatientResult]:
    """Every record diagnosed with at most ``concurrency`` requests in flight; results in record order.

    Whatever one patient raises (an Exception, not a cancellation) becomes that patient's error;
    the unexpected ones (not a DiagnosisError or a missing folder) are logged with their traceback."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    gate = asyncio.Semaphore(concurrency)

    def failed(record: PatientRecord, e: Exception, message: str) -> PatientResult:
        return PatientResult(record.patient_id, record.label, 0.0, error=message, locations=record.locations, reason=failure_reason(e))

    async def one(record: PatientRecord) -> PatientResult:
        async with gate:
            started = time.perf_counter()
            try:
                files = await asyncio.to_thread(read_patient_files, record.path)
                age = None if math.isnan(record.age) else record.age
                diagnosis = await client.diagnose(files, age)
                result = PatientResult(record.patient_id, record.label, 0.0, diagnosis=diagnosis, locations=record.locations)
            except (DiagnosisError, FileNotFoundError) as e:
                result = failed(record, e, str(e))
            except Exception as e:  # a bug, or a file that cannot be read: this patient's failure, not the run's
                log.exception("patient %s: %s", record.patient_id, failure_reason(e))
                result = failed(record, e, f"{failure_reason(e)}: {e}")
            result.seconds = time.perf_counter() - started
        if on_done:
            on_done(result)
        return result

    return list(await asyncio.gather(*(one(r) for r in records)))


def score(results: Sequence[PatientResult], settings: FusionSettings) -> dict[str, dict[str, float]]:
    """Table 3 over the patients that got a diagnosis, the paper-λ row included."""
    done = [r for r in results if r.diagnosis is not None]
    if not done:
        return {}
    return table3([r.diagnosis.components() for r in done], [r.label for r in done], settings)


async def evaluate_async(
    records: Sequence[PatientRecord],
    url: str = "localhost:8001",
    concurrency: int = 4,
    on_done: Callable[[PatientResult], None] | None = None,
    **client_args,
) -> Evaluation:
    """``client_args``: AsyncDiagnosisClient's keyword arguments (timeout_s, retries, max_bytes, ssl, tls_*)."""
    async with AsyncDiagnosisClient(url, **client_args) as client:
        settings = await client.fusion_settings()  # fails fast when no server answers
        started = time.perf_counter()
        results = await diagnose_records(client, records, concurrency, on_done)
        wall = time.perf_counter() - started
    return Evaluation(results, settings, wall, score(results, settings))


def evaluate(records: Sequence[PatientRecord], **kwargs) -> Evaluation:
    """Blocking wrapper of :func:`evaluate_async` (same keyword arguments)."""
    return asyncio.run(evaluate_async(records, **kwargs))


def compare_evaluations(reference: Evaluation, other: Evaluation) -> dict:
    """How far ``other`` (e.g. served in bf16) moves from ``reference`` (fp32) on the same patients.

    Per strategy of both settings: patients compared, decisions that differ, and the largest
    change of the patient score, recomputed from the returned components; plus each run's
    Table 3. Patients without a diagnosis in either run are left out and counted.
    """
    theirs = {r.patient_id: r for r in other.diagnosed}
    pairs = [(r, theirs[r.patient_id]) for r in reference.diagnosed if r.patient_id in theirs]
    strategies = {}
    for name in reference.settings.strategies:
        if name not in other.settings.strategies:
            continue
        a = [reference.settings.decide(r.diagnosis.components(), name) for r, _ in pairs]
        b = [other.settings.decide(o.diagnosis.components(), name) for _, o in pairs]
        strategies[name] = {
            "patients": len(pairs),
            "decisions_changed": sum(x.label != y.label for x, y in zip(a, b)),
            "max_abs_dp": json_number(max((abs(x.p_malignant - y.p_malignant) for x, y in zip(a, b)), default=math.nan)),
        }
    return {
        "patients": len(pairs),
        "left_out": len(reference.results) + len(other.results) - 2 * len(pairs),
        "strategies": strategies,
        "table_reference": {n: {k: json_number(m[k]) for k in METRICS} for n, m in reference.table.items()},
        "table_other": {n: {k: json_number(m[k]) for k in METRICS} for n, m in other.table.items()},
    }
