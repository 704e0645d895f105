"""Reuse of built TensorRT plans: the plan beside the ONNX when it is up to date, or a verified
plan from a plan cache shared by servers (e.g. a volume shared by the pods of a Deployment),
kept under a key of the ONNX hash, TensorRT version, precision and GPU model.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wff.serving.trt_preflight import PLAN_FILE, REPORT_SUFFIX, PlanSpec

PLAN_CACHE_ENV = "WFF_TRT_PLAN_CACHE"  # folder of verified plans shared by servers (wff trt build --plan-cache)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def up_to_date(spec: PlanSpec, onnx_hash: str, trt_version: str, precision: str, device: Mapping[str, Any]) -> bool:
    """The plan beside ``spec.onnx`` was built from this ONNX, by this TensorRT, at this
    precision, on this GPU model, and passed its verification (or was not verified)."""
    if not (spec.plan.is_file() and spec.report.is_file()):
        return False
    try:
        report = json.loads(spec.report.read_text())
    except (OSError, ValueError):
        return False
    return (
        report.get("onnx_sha256") == onnx_hash
        and report.get("tensorrt_version") == trt_version
        and report.get("builder", {}).get("precision") == precision
        and {k: report.get("gpu", {}).get(k) for k in ("name", "compute_capability")}
        == {k: device.get(k) for k in ("name", "compute_capability")}
        and report.get("plan_sha256") == sha256(spec.plan)
        and report.get("verification", {}).get("passed", True) is not False
    )


def plan_cache_entry(cache: str | Path, spec: PlanSpec, onnx_hash: str, trt_version: str, precision: str,
                     device: Mapping[str, Any]) -> Path:
    """The folder of ``cache`` that holds ``spec``'s plan built from this ONNX, by this TensorRT, at
    this precision, on this GPU model (what :func:`up_to_date` compares)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", str(device.get("name", "")).lower()).strip("-")
    return Path(cache) / spec.step / f"{onnx_hash[:16]}-trt{trt_version}-{precision}-{gpu}-cc{device.get('compute_capability')}"


def restore_plan(entry: Path, spec: PlanSpec) -> bool:
    """Copy a cached plan and its report beside ``spec.onnx``; False when the cache has none."""
    plan, report = entry / PLAN_FILE, entry / (PLAN_FILE + REPORT_SUFFIX)
    if not (plan.is_file() and report.is_file()):
        return False
    for source, target in ((plan, spec.plan), (report, spec.report)):
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    return True


def store_plan(entry: Path, spec: PlanSpec) -> None:
    """Put ``spec``'s plan and report into the cache folder ``entry``, whole or not at all: they are
    copied into a temporary folder that is then renamed; when another server stored the same
    plan first, its copy is kept."""
    if entry.exists():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    shutil.copyfile(spec.plan, tmp / PLAN_FILE)
    shutil.copyfile(spec.report, tmp / (PLAN_FILE + REPORT_SUFFIX))
    try:
        tmp.rename(entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():
            raise


__all__ = ["PLAN_CACHE_ENV", "sha256", "up_to_date", "plan_cache_entry", "restore_plan", "store_plan"]
