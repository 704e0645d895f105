"""TensorRT plans for the detector and classifier of a ``--target tensorrt`` model repository.

    wff repo build --target tensorrt --artifacts runs/paper repo/
    wff trt check repo/                      # preflight only; runs anywhere (no TensorRT needed)
    wff trt build repo/ [--precision fp16|fp32] [--workspace-mib 4096] [--timing-cache FILE]

``build`` is meant to run inside the NGC tritonserver container (docker/), whose TensorRT is
the one Triton's TensorRT backend loads: a plan only deserializes under the TensorRT version
and on the GPU architecture that built it. For each of ``detector`` and ``classifier``:

1. preflight (:mod:`wff.serving.trt_preflight`: :func:`~wff.serving.trt_preflight.plan_spec`,
   :func:`~wff.serving.trt_preflight.onnx_tensorrt_issues`): the step's config.pbtxt must
   say ``platform: "tensorrt_plan"``; its max_batch_size, dims and preferred batch sizes give
   the optimization profile (:func:`~wff.serving.trt_preflight.profile_shapes`), cross-checked
   against ``model.onnx``'s signature and, when the repository holds a profile.json, against
   ``wff.contracts``; every op of the graph is checked against ``tensorrt_onnx_ops.json``
   (TensorRT 10's ONNX parser);
2. build (:func:`build_engine`, here): TensorRT 10 ONNX parser, one optimization profile whose batch
   range is min 1 / opt = the largest preferred batch size / max = max_batch_size with every
   other dim fixed, FP16 (default) or strict FP32 (TF32 off), a timing cache file shared by
   the builds; the serialized engine is written to ``model.plan``. TensorRT, CUDA and the plan
   runner come from :mod:`wff.serving.trt_runtime`;
3. verify (:mod:`wff.serving.trt_verify`: :func:`~wff.serving.trt_verify.verify_plan`): the plan
   and ONNX Runtime (CPU, FP32) run the same inputs at batch B and at batch 1, compared output by
   output within :data:`~wff.serving.trt_verify.TOLERANCES`
   (:func:`~wff.serving.trt_verify.compare_outputs`). The inputs are real slices and clips,
   prepared as the served ensemble prepares them (:func:`~wff.serving.trt_verify.patient_samples`),
   from a patient folder or a synthetic patient, or an npz;
4. ``model.plan.json`` beside the plan records the TensorRT version, GPU, precision, builder
   settings, profile shapes, build seconds, file hashes and the verification.

A plan whose ``model.plan.json`` names the same ONNX hash, TensorRT version, precision and GPU
model is up to date and skipped (``--force`` rebuilds), so the container's entrypoint can call
``wff trt build`` on every start. With a plan cache (``--plan-cache DIR`` or
``$WFF_TRT_PLAN_CACHE``, e.g. a volume shared by the pods of a Deployment) a verified plan is
also kept under a key of the same four facts (:func:`~wff.serving.trt_cache.plan_cache_entry`),
and a new pod on the same GPU model copies it instead of building it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from wff.serving.trt_cache import plan_cache_entry, restore_plan, sha256, store_plan, up_to_date
from wff.serving.trt_preflight import MODEL_STEPS, PlanError, PlanSpec, preflight
from wff.serving.trt_runtime import (
    CudaRuntime,
    OnnxRuntimeRunner,
    TensorRTRunner,
    import_tensorrt,
    same_release,
    triton_tensorrt_version,
)
from wff.serving.trt_verify import (
    DEFAULT_VERIFY_BATCH,
    PRECISIONS,
    TOLERANCES,
    load_samples,
    verification_inputs,
    verify_plan,
)

log = logging.getLogger(__name__)

DEFAULT_PRECISION = "fp16"
DEFAULT_WORKSPACE_MIB = 4096  # builder scratch memory limit; tactics needing more are skipped
TIMING_CACHE_NAME = "tensorrt_timing.cache"  # default cache file, at the repository root


def trtexec_command(spec: PlanSpec, precision: str, workspace_mib: int, timing_cache: Path | None) -> list[str]:
    """The equivalent trtexec call, recorded for people rebuilding a plan by hand."""
    shapes = {k: ",".join(f"{p.name}:{'x'.join(map(str, getattr(p, k)))}" for p in spec.inputs) for k in ("min", "opt", "max")}
    cmd = [
        "trtexec", f"--onnx={spec.onnx}", f"--saveEngine={spec.plan}",
        f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}",
        f"--memPoolSize=workspace:{workspace_mib}M",
    ]
    cmd.append("--fp16" if precision == "fp16" else "--noTF32")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def build_engine(
    trt, spec: PlanSpec, precision: str, workspace_mib: int, timing_cache: Path | None, logger
) -> tuple[bytes, dict[str, Any]]:
    """Parse ``spec.onnx`` and build a serialized engine; returns (plan bytes, builder settings)."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PlanError(f"{spec.onnx}: TensorRT's ONNX parser failed:\n  {errors}")
    net_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if net_inputs != [p.name for p in spec.inputs]:
        raise PlanError(f"{spec.onnx}: TensorRT sees inputs {net_inputs}, config.pbtxt has {[p.name for p in spec.inputs]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for p in spec.inputs:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)

    cache_loaded = False
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("%s: timing cache unusable here (other GPU or TensorRT?); starting an empty one", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    else:
        cache_loaded = bool(cache_bytes)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise PlanError(f"{spec.onnx}: TensorRT failed to build an engine (see the TensorRT log above)")
    if timing_cache is not None:  # a unique temporary name: pods sharing the cache file may write it at once
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=timing_cache.name + ".", dir=timing_cache.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    settings = {
        "precision": precision,
        "fp16": precision == "fp16",
        "tf32": precision == "fp16",  # FP16 builds keep TensorRT's default TF32 for FP32 layers
        "workspace_mib": workspace_mib,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "timing_cache_loaded": cache_loaded,
        "build_seconds": round(seconds, 2),
        "layers": network.num_layers,
    }
    return bytes(serialized), settings


def build_plans(
    repository: str | Path,
    precision: str = DEFAULT_PRECISION,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: str | Path | None = None,
    models: Sequence[str] = MODEL_STEPS,
    samples: str | Path | None = None,
    verify_batch: int = DEFAULT_VERIFY_BATCH,
    verify: bool = True,
    atol_overrides: Mapping[str, float] | None = None,
    force: bool = False,
    plan_cache: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Build, verify and describe the plans of ``models`` in ``repository``; returns the reports.

    Plans are verified on ``samples`` (:func:`verification_inputs`: an npz, a patient folder, or
    by default a synthetic patient), prepared once when the first plan needs building. With
    ``plan_cache``, a plan that is not up to date is first looked up there
    (:func:`plan_cache_entry`), and a newly built plan that passed is stored there.
    Raises :class:`PlanError` on a bad repository or graph, a failed build or a failed
    verification (the failing plan is kept for inspection, its report says ``passed: false``),
    and :class:`TensorRTUnavailable` without TensorRT.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if workspace_mib < 1:
        raise ValueError(f"workspace must be >= 1 MiB, got {workspace_mib}")
    repository = Path(repository)
    checked = preflight(repository, models)
    blocking = [f"{spec.step}: {issue}" for spec, issues in checked for issue in issues]
    if blocking:
        raise PlanError("graphs TensorRT 10 would not build as our contracts need:\n  " + "\n  ".join(blocking))
    known_outputs = {name for spec, _ in checked for name, _ in spec.outputs}
    unknown = sorted(set(atol_overrides or {}) - known_outputs)
    if unknown:
        raise ValueError(f"--atol names unknown outputs {unknown}; outputs are {sorted(known_outputs)}")

    trt = import_tensorrt()
    trt_version = str(trt.__version__)
    server_version = triton_tensorrt_version()
    if server_version is not None and not same_release(trt_version, server_version):
        raise PlanError(
            f"the TensorRT Python module is {trt_version} but Triton's TensorRT backend links {server_version}: "
            f"plans built here would not load; install tensorrt-cu12-bindings=={server_version} (docker/Dockerfile does)"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # RoiAlign is imported as the ROIAlign_TRT plugin
    cuda = CudaRuntime()
    device = cuda.device()
    cache_path = Path(timing_cache) if timing_cache is not None else repository / TIMING_CACHE_NAME
    tolerance = TOLERANCES[precision].with_overrides(atol_overrides or {})

    reports = []
    inputs: tuple[dict[str, np.ndarray], str] | None = None
    for spec, _ in checked:
        onnx_hash = sha256(spec.onnx)
        if not force and up_to_date(spec, onnx_hash, trt_version, precision, device):
            log.info("%s: %s is up to date (TensorRT %s, %s)", spec.step, spec.plan, trt_version, precision)
            reports.append(json.loads(spec.report.read_text()))
            continue
        entry = plan_cache_entry(plan_cache, spec, onnx_hash, trt_version, precision, device) if plan_cache else None
        if (entry is not None and not force and restore_plan(entry, spec)
                and up_to_date(spec, onnx_hash, trt_version, precision, device)):
            log.info("%s: %s copied from the plan cache %s", spec.step, spec.plan, entry)
            reports.append(json.loads(spec.report.read_text()))
            continue
        if verify and inputs is None:
            inputs = verification_inputs(repository, samples, verify_batch)
        log.info("%s: building %s (%s, profile %s)", spec.step, spec.plan, precision, [asdict(p) for p in spec.inputs])
        plan, settings = build_engine(trt, spec, precision, workspace_mib, cache_path, logger)
        tmp = spec.plan.with_name(spec.plan.name + ".tmp")
        tmp.write_bytes(plan)
        tmp.replace(spec.plan)
        report: dict[str, Any] = {
            "model": spec.step,
            "plan": str(spec.plan),
            "plan_sha256": sha256(spec.plan),
            "plan_bytes": spec.plan.stat().st_size,
            "onnx": str(spec.onnx),
            "onnx_sha256": onnx_hash,
            "tensorrt_version": trt_version,
            "triton_tensorrt_version": server_version,
            "gpu": device,
            "builder": settings,
            "profile": {"max_batch_size": spec.max_batch_size, "opt_batch": spec.opt_batch,
                        "inputs": [asdict(p) for p in spec.inputs]},
            "trtexec_equivalent": trtexec_command(spec, precision, workspace_mib, cache_path),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        verification = None
        if verify:
            arrays, origin = inputs
            verification = verify_plan(spec, TensorRTRunner(trt, plan, logger, cuda), OnnxRuntimeRunner(spec.onnx),
                                       load_samples(spec, arrays, verify_batch, origin), precision, tolerance)
            report["verification"] = {**verification.to_dict(), "samples": origin}
        spec.report.write_text(json.dumps(report, indent=2) + "\n")
        reports.append(report)
        if verification is not None and not verification.passed:
            failures = [f for c in verification.batches for f in c.failures]
            raise PlanError(f"{spec.step}: {spec.plan} differs from ONNX Runtime beyond the {precision} tolerance:\n  "
                            + "\n  ".join(failures) + f"\n(report: {spec.report})")
        if entry is not None:
            store_plan(entry, spec)
    return reports


__all__ = ["DEFAULT_PRECISION", "DEFAULT_WORKSPACE_MIB", "TIMING_CACHE_NAME", "build_plans", "build_engine", "trtexec_command"]
