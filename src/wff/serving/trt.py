"""TensorRT plans for the detector and classifier of a ``--target tensorrt`` model repository.

    wff repo build --target tensorrt --artifacts runs/paper repo/
    wff trt check repo/                      # preflight only; runs anywhere (no TensorRT needed)
    wff trt build repo/ [--precision fp16|fp32] [--workspace-mib 4096] [--timing-cache FILE]

``build`` is meant to run inside the NGC tritonserver container (docker/), whose TensorRT is
the one Triton's TensorRT backend loads: a plan only deserializes under the TensorRT version
and on the GPU architecture that built it. For each of ``detector`` and ``classifier``:

1. preflight (:func:`plan_spec`, :func:`onnx_tensorrt_issues`): the step's config.pbtxt must
   say ``platform: "tensorrt_plan"``; its max_batch_size, dims and preferred batch sizes give
   the optimization profile (:func:`profile_shapes`), cross-checked against ``model.onnx``'s
   signature and, when the repository holds a profile.json, against ``wff.contracts``; every
   op of the graph is checked against ``tensorrt_onnx_ops.json`` (TensorRT 10's ONNX parser);
2. build (:func:`build_engine`): TensorRT 10 ONNX parser, one optimization profile whose batch
   range is min 1 / opt = the largest preferred batch size / max = max_batch_size with every
   other dim fixed, FP16 (default) or strict FP32 (TF32 off), a timing cache file shared by
   the builds; the serialized engine is written to ``model.plan``;
3. verify (:func:`verify_plan`): the plan and ONNX Runtime (CPU, FP32) run the same inputs
   at batch B and at batch 1, compared output by output within :data:`TOLERANCES`
   (:func:`compare_outputs`). The inputs are real slices and clips, prepared as the served
   ensemble prepares them (:func:`patient_samples`), from a patient folder or a synthetic
   patient, or an npz;
4. ``model.plan.json`` beside the plan records the TensorRT version, GPU, precision, builder
   settings, profile shapes, build seconds, file hashes and the verification.

A plan whose ``model.plan.json`` names the same ONNX hash, TensorRT version, precision and GPU
model is up to date and skipped (``--force`` rebuilds), so the container's entrypoint can call
``wff trt build`` on every start. With a plan cache (``--plan-cache DIR`` or
``$WFF_TRT_PLAN_CACHE``, e.g. a volume shared by the pods of a Deployment) a verified plan is
also kept under a key of the same four facts (:func:`plan_cache_entry`), and a new pod on the
same GPU model copies it instead of building it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

MODEL_STEPS = ("detector", "classifier")  # the exported networks; the Python steps have no plan
PRECISIONS = ("fp16", "fp32")
DEFAULT_PRECISION = "fp16"
DEFAULT_WORKSPACE_MIB = 4096  # builder scratch memory limit; tactics needing more are skipped
DEFAULT_VERIFY_BATCH = 4
TIMING_CACHE_NAME = "tensorrt_timing.cache"  # default cache file, at the repository root
PLAN_CACHE_ENV = "WFF_TRT_PLAN_CACHE"  # folder of verified plans shared by servers (wff trt build --plan-cache)
PLATFORM = "tensorrt_plan"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
REPORT_SUFFIX = ".json"  # model.plan -> model.plan.json
TRITON_TENSORRT_BACKEND = Path("/opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so")
TENSORRT_MISSING = "TensorRT is not installed: run this inside the NGC tritonserver container, see docker/README.md"
OPS_FILE = "tensorrt_onnx_ops.json"

# ONNX element types allowed at a plan's inputs/outputs (the Triton contracts use FP32 and INT32).
_IO_TYPES = {1: "TYPE_FP32", 6: "TYPE_INT32"}
_DOUBLE = 11  # onnx.TensorProto.DOUBLE


class TensorRTUnavailable(RuntimeError):
    """The TensorRT Python API (or the CUDA runtime) cannot be imported on this machine."""


class PlanError(RuntimeError):
    """A repository, graph or plan that cannot become (or is not) a correct TensorRT plan."""


# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tolerance:
    """How far a plan's outputs may be from ONNX Runtime's (FP32, CPU) and still pass.

    Continuous (FP32) outputs are compared by max abs difference against ``atol[name]``
    (``default_atol`` for outputs not named). Discrete (INT32) outputs, the detector's labels
    and count, must be equal; a sample (batch item) where they differ is *misaligned*: its
    rows no longer describe the same detections, so its continuous outputs are left out of
    the comparison, and at most ``max_misaligned`` (a fraction of the samples) may be.
    """

    atol: Mapping[str, float]
    default_atol: float
    max_misaligned: float

    def for_output(self, name: str) -> float:
        return float(self.atol.get(name, self.default_atol))

    def with_overrides(self, overrides: Mapping[str, float]) -> "Tolerance":
        return Tolerance({**self.atol, **overrides}, self.default_atol, self.max_misaligned)


# Why FP16 is looser: FP16 keeps an 11-bit significand (unit roundoff 2**-11 ~ 4.9e-4) and
# rounding compounds over the ~100 conv layers of the paper networks, so probabilities move by
# up to ~1e-2; box corners are decoded through exp() of regression deltas and expressed in
# pixels of a 512-px image, where the FP16 spacing alone is 0.25-0.5 px, so they move by up to
# ~1-2 px. A detection scoring within that noise of the 0.05 score floor, an NMS IoU threshold
# or a TopK rank can appear, vanish or swap: the sample's count/labels change (misaligned),
# which is allowed for 1 sample in 8. FP32 builds clear TF32 (which rounds conv/GEMM inputs to
# a 10-bit mantissa), so only summation order differs from ONNX Runtime (~1e-5 relative):
# 1e-3 on probabilities, 0.05 px on boxes, no misaligned sample.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol={"detector_boxes": 0.05}, default_atol=1e-3, max_misaligned=0.0),
    "fp16": Tolerance(atol={"detector_boxes": 2.0}, default_atol=2e-2, max_misaligned=0.125),
}


@dataclass
class Comparison:
    """One batch of plan outputs against the reference."""

    batch: int
    max_abs_diff: dict[str, float | None]  # continuous outputs; None = no aligned sample to compare
    misaligned: int  # samples whose discrete outputs differ
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    discrete: Iterable[str],
    tolerance: Tolerance,
) -> Comparison:
    """Compare one batch of outputs (dim 0 = samples) by name; see :class:`Tolerance`.

    NaN in the same place in both counts as equal; NaN or inf against a finite value fails.
    """
    discrete = set(discrete)
    failures: list[str] = []
    missing = sorted(set(reference) - set(candidate))
    if missing:
        return Comparison(0, {}, 0, [f"plan has no outputs {missing}"])
    shapes = {n: (np.shape(reference[n]), np.shape(candidate[n])) for n in reference}
    bad = {n: s for n, s in shapes.items() if s[0] != s[1]}
    if bad:
        return Comparison(0, {}, 0, [f"{n}: shape {c} from the plan, {r} from ONNX Runtime" for n, (r, c) in sorted(bad.items())])
    batch = len(next(iter(reference.values()))) if reference else 0
    aligned = np.ones(batch, dtype=bool)
    for name in sorted(discrete & set(reference)):
        ref = np.asarray(reference[name]).reshape(batch, -1)
        got = np.asarray(candidate[name]).reshape(batch, -1)
        aligned &= (ref == got).all(axis=1)
    misaligned = int(batch - aligned.sum())
    if batch and misaligned / batch > tolerance.max_misaligned:
        names = sorted(discrete & set(reference))
        failures.append(
            f"{misaligned} of {batch} samples differ in {names} (allowed fraction {tolerance.max_misaligned:g})"
        )
    diffs: dict[str, float | None] = {}
    for name in reference:
        if name in discrete:
            continue
        if not aligned.any():
            diffs[name] = None
            continue
        ref = np.asarray(reference[name], dtype=np.float64)[aligned]
        got = np.asarray(candidate[name], dtype=np.float64)[aligned]
        both_nan = np.isnan(ref) & np.isnan(got)
        with np.errstate(invalid="ignore"):
            delta = np.where(both_nan, 0.0, np.abs(ref - got))
        delta = np.where(np.isnan(delta), np.inf, delta)
        diff = float(delta.max()) if delta.size else 0.0
        diffs[name] = diff
        atol = tolerance.for_output(name)
        if not diff <= atol:
            failures.append(f"{name}: max abs difference {diff:.3g} > atol {atol:g}")
    return Comparison(batch, diffs, misaligned, failures)


# --------------------------------------------------------------------------- repository specs


@dataclass(frozen=True)
class InputProfile:
    """Optimization-profile shapes of one plan input, batch dim first."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class PlanSpec:
    """What one step's plan must be, read from its config.pbtxt (and checked against the rest)."""

    step: str
    version_dir: Path
    plan_file: str
    max_batch_size: int
    opt_batch: int
    inputs: tuple[InputProfile, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, Triton data type) in config order

    @property
    def onnx(self) -> Path:
        return self.version_dir / ONNX_FILE

    @property
    def plan(self) -> Path:
        return self.version_dir / self.plan_file

    @property
    def report(self) -> Path:
        return self.version_dir / (self.plan_file + REPORT_SUFFIX)

    @property
    def discrete_outputs(self) -> tuple[str, ...]:
        return tuple(name for name, dtype in self.outputs if dtype != "TYPE_FP32")


def read_model_config(path: str | Path):
    """Parse a config.pbtxt into ``model_config_pb2.ModelConfig``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except FileNotFoundError as e:
        raise PlanError(f"{path}: no model config; build the repository with `wff repo build --target tensorrt`") from e
    except text_format.ParseError as e:
        raise PlanError(f"{path}: not a valid model config: {e}") from e


def choose_opt_batch(max_batch_size: int, preferred: Sequence[int]) -> int:
    """The profile's opt batch: the largest preferred batch size within [1, max], else max.

    The dynamic batcher forms batches of the preferred sizes when it can, so kernels are
    tuned for the largest of them; a patient's detector request (all its slices) is usually
    close to it as well.
    """
    usable = [b for b in preferred if 1 <= b <= max_batch_size]
    return max(usable) if usable else max_batch_size


def profile_shapes(config, opt_batch: int | None = None) -> tuple[InputProfile, ...]:
    """min / opt / max shapes of every input of a batching model config (``ModelConfig``).

    The batch dim ranges over 1 .. ``max_batch_size`` with ``opt_batch`` (default
    :func:`choose_opt_batch`); the other dims are the config's and must all be fixed.
    """
    max_batch = int(config.max_batch_size)
    if max_batch < 1:
        raise PlanError(f"model {config.name!r}: max_batch_size is {max_batch}; a plan needs a batching model (max_batch_size >= 1)")
    if opt_batch is None:
        opt_batch = choose_opt_batch(max_batch, list(config.dynamic_batching.preferred_batch_size))
    if not 1 <= opt_batch <= max_batch:
        raise PlanError(f"model {config.name!r}: opt batch {opt_batch} is outside 1..{max_batch} (max_batch_size)")
    if not config.input:
        raise PlanError(f"model {config.name!r}: config has no inputs")
    shapes = []
    for tensor in config.input:
        dims = tuple(int(d) for d in tensor.dims)
        if any(d < 1 for d in dims):
            raise PlanError(
                f"model {config.name!r}: input {tensor.name!r} has dims {list(dims)}; only the batch dim may vary in a plan"
            )
        shapes.append(InputProfile(tensor.name, (1, *dims), (opt_batch, *dims), (max_batch, *dims)))
    return tuple(shapes)


def _latest_version_dir(model_dir: Path) -> Path:
    versions = sorted((int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) if model_dir.is_dir() else []
    if not versions:
        raise PlanError(f"{model_dir}: no numeric version folder (e.g. 1/)")
    return versions[-1][1]


def _repository_profile(repository: Path):
    """The Profile saved in the repository (any <model>/<version>/profile.json), or None."""
    from wff.config import load_profile

    for path in sorted(repository.glob("*/*/profile.json")):
        return load_profile(path)
    return None


def _data_type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.DataType.Name(value)


def plan_spec(repository: str | Path, step: str, opt_batch: int | None = None) -> PlanSpec:
    """Read and cross-check what ``step``'s plan must be; raises :class:`PlanError`."""
    if step not in MODEL_STEPS:
        raise PlanError(f"unknown model {step!r}; plans are built for {list(MODEL_STEPS)}")
    repository = Path(repository)
    model_dir = repository / step
    config = read_model_config(model_dir / "config.pbtxt")
    if config.platform != PLATFORM:
        kind = config.platform or config.backend or "?"
        raise PlanError(
            f"{model_dir}/config.pbtxt: platform/backend is {kind!r}, not {PLATFORM!r}; "
            f"rebuild the repository with `wff repo build --target tensorrt`"
        )
    inputs = profile_shapes(config, opt_batch)
    outputs = tuple((o.name, _data_type_name(o.data_type)) for o in config.output)
    version_dir = _latest_version_dir(model_dir)
    spec = PlanSpec(
        step=step,
        version_dir=version_dir,
        plan_file=config.default_model_filename or PLAN_FILE,
        max_batch_size=int(config.max_batch_size),
        opt_batch=inputs[0].opt[0],
        inputs=inputs,
        outputs=outputs,
    )
    _check_against_contracts(spec, config, repository)
    if not spec.onnx.is_file():
        raise PlanError(f"{spec.onnx}: missing; `wff repo build --target tensorrt --artifacts DIR` copies it beside the plan")
    _check_onnx_signature(spec, config)
    return spec


def _check_against_contracts(spec: PlanSpec, config, repository: Path) -> None:
    profile = _repository_profile(repository)
    if profile is None:
        log.warning("%s: no profile.json in the repository; config.pbtxt is not checked against wff.contracts", repository)
        return
    from wff.contracts import contracts_for

    contract = contracts_for(profile).step(spec.step)
    got = [(t.name, _data_type_name(t.data_type), tuple(t.dims)) for t in config.input]
    want = [(s.name, s.data_type, s.dims) for s in contract.inputs]
    got_out = [(t.name, _data_type_name(t.data_type), tuple(t.dims)) for t in config.output]
    want_out = [(s.name, s.data_type, s.dims) for s in contract.outputs]
    if got != want or got_out != want_out or spec.max_batch_size != contract.max_batch_size:
        raise PlanError(
            f"{spec.version_dir.parent}/config.pbtxt does not match wff.contracts for profile {profile.name!r}: "
            f"config inputs {got}, outputs {got_out}, max_batch_size {spec.max_batch_size}; "
            f"contract inputs {want}, outputs {want_out}, max_batch_size {contract.max_batch_size}"
        )


def _value_dims(value) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)


def _check_onnx_signature(spec: PlanSpec, config) -> None:
    import onnx

    graph = onnx.load(str(spec.onnx), load_external_data=False).graph
    for kind, values, tensors in (("input", graph.input, config.input), ("output", graph.output, config.output)):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            raise PlanError(f"{spec.onnx}: {kind}s {names}, config.pbtxt says {[t.name for t in tensors]}")
        for value, tensor in zip(values, tensors, strict=True):
            dims = _value_dims(value)
            if dims[1:] != tuple(tensor.dims) or len(dims) != len(tensor.dims) + 1:
                raise PlanError(f"{spec.onnx}: {kind} {value.name} has dims {list(dims)}, config.pbtxt says [batch, {list(tensor.dims)}]")


# --------------------------------------------------------------------------- op support


def load_ops_table() -> dict[str, Any]:
    """``tensorrt_onnx_ops.json``: the ops TensorRT 10's ONNX parser imports, with its source."""
    return json.loads(resources.files("wff.serving").joinpath(OPS_FILE).read_text())


# Ops whose outputs are build-time constants when all their inputs are.
_FOLDABLE = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Flatten"}
# (op, input index) pairs whose input must be a build-time constant in our graphs.
_CONSTANT_INPUTS = {
    "TopK": (1,),
    "Slice": (3,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Pad": (3,),
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                            "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
_DATA_DEPENDENT = {"NonZero", "NonMaxSuppression", "Loop", "If", "Scan", "Unique", "Compress"}
_RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
TOPK_MAX_K = 3840  # support matrix: "K input must be less than 3840"


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    values = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        values[a.name] = v.decode() if isinstance(v, bytes) else v
    return values


def _constants(graph) -> dict[str, np.ndarray | None]:
    """Names of build-time constant values in ``graph``, with their value where known."""
    from onnx import numpy_helper

    known: dict[str, np.ndarray | None] = {i.name: numpy_helper.to_array(i) for i in getattr(graph, "initializer", ())}
    for node in graph.node:
        if node.op_type == "Constant":
            attrs = {a.name: a for a in node.attribute}
            value = numpy_helper.to_array(attrs["value"].t) if "value" in attrs else None
            known[node.output[0]] = value
        elif node.op_type in _FOLDABLE and all(i in known for i in node.input if i):
            first = known.get(node.input[0]) if node.input else None
            value = first if node.op_type in {"Cast", "Identity"} else None
            for out in node.output:
                known[out] = value
    return known


def onnx_tensorrt_issues(model, ops_table: Mapping[str, Any] | None = None) -> list[str]:
    """Why TensorRT 10 would reject ``model`` or build it other than our contracts need.

    ``model`` is a path or an ``onnx.ModelProto``. Checks (see tensorrt_onnx_ops.json):
    opset within the parser's range; every op in the support matrix and in the default
    domain; no data-dependent-shape ops; graph inputs/outputs FLOAT or INT32 with only dim 0
    dynamic; no DOUBLE tensors; TopK K a constant below 3840 with sorted=1; constant axes
    inputs; RoiAlign avg mode with an explicit sampling_ratio; Resize modes; DeformConv
    symmetric pads; pooling dilations and MaxPool's Indices output. Empty list = fine.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = ops_table or load_ops_table()
    supported = table["supported"]
    low, high = table["opset_range"]
    issues: list[str] = []
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx")
    if opset is None or not low <= opset <= high:
        issues.append(f"default-domain opset {opset} outside the parser's range {low}..{high}")

    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            elem = v.type.tensor_type.elem_type
            if elem not in _IO_TYPES:
                issues.append(f"graph {kind} {v.name}: element type {onnx.TensorProto.DataType.Name(elem)}; contracts allow FLOAT or INT32")
            dims = v.type.tensor_type.shape.dim
            dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
            if dynamic != [0]:
                issues.append(f"graph {kind} {v.name}: dynamic dims {dynamic}; only dim 0 (batch) may be dynamic")
    if any(i.data_type == _DOUBLE for i in graph.initializer):
        issues.append("DOUBLE initializers: TensorRT casts DOUBLE down to FLOAT")

    for g in [graph, *model.functions]:  # model-local functions too (the parser imports them)
        consts = _constants(g)
        for node in g.node:
            where = f"{node.op_type} {node.name or node.output[0]!r}"
            if node.domain not in ("", "ai.onnx"):
                issues.append(f"{where}: domain {node.domain!r} needs a TensorRT plugin")
                continue
            if node.op_type not in supported:
                issues.append(f"{where}: not supported by TensorRT 10's ONNX parser")
                continue
            if node.op_type in _DATA_DEPENDENT:
                issues.append(f"{where}: data-dependent output shape; our plans must be static")
            attrs = _attrs(node)
            for index in _CONSTANT_INPUTS.get(node.op_type, ()):
                if len(node.input) > index and node.input[index] and node.input[index] not in consts:
                    issues.append(f"{where}: input {index} ({node.input[index]}) is not a build-time constant")
            issues.extend(f"{where}: {msg}" for msg in _attribute_issues(node.op_type, node, attrs, consts))
    return issues


def _attribute_issues(op: str, node, attrs: dict[str, Any], consts: Mapping[str, np.ndarray | None]) -> list[str]:
    problems = []
    if op == "TopK":
        if attrs.get("sorted", 1) != 1:
            problems.append("sorted must be 1")
        k = consts.get(node.input[1]) if len(node.input) > 1 else np.array(attrs.get("k", 0))
        if k is not None and np.size(k) == 1 and not int(np.ravel(k)[0]) < TOPK_MAX_K:
            problems.append(f"K = {int(np.ravel(k)[0])} is not below {TOPK_MAX_K}")
    elif op == "RoiAlign":
        if attrs.get("mode", "avg") != "avg":
            problems.append(f"mode {attrs.get('mode')!r}; torchvision's RoIAlign (and ours) is 'avg'")
        if "sampling_ratio" not in attrs or attrs["sampling_ratio"] <= 0:
            problems.append(
                "sampling_ratio must be set explicitly (> 0): TensorRT's importer defaults to 1, ONNX to 0 (adaptive)"
            )
    elif op == "Resize":
        if attrs.get("mode", "nearest") not in {"nearest", "linear"}:
            problems.append(f"mode {attrs.get('mode')!r}; TensorRT imports nearest and linear")
        if attrs.get("coordinate_transformation_mode", "half_pixel") not in _RESIZE_COORDS:
            problems.append(f"coordinate_transformation_mode {attrs.get('coordinate_transformation_mode')!r} unsupported")
        if attrs.get("mode", "nearest") == "nearest" and attrs.get("nearest_mode", "round_prefer_floor") not in _RESIZE_NEAREST:
            problems.append(f"nearest_mode {attrs.get('nearest_mode')!r} unsupported")
        if attrs.get("antialias", 0):
            problems.append("antialias is unsupported")
        if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            problems.append("keep_aspect_ratio_policy must be 'stretch'")
    elif op == "DeformConv":
        pads = list(attrs.get("pads", []))
        half = len(pads) // 2
        if pads and pads[:half] != pads[half:]:
            problems.append(f"pads {pads} are not symmetric")
    elif op in ("MaxPool", "AveragePool"):
        if any(d != 1 for d in attrs.get("dilations", [])):
            problems.append("dilations must be empty or all ones")
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append("the Indices output is unsupported")
    elif op == "Cast" and attrs.get("to") == _DOUBLE:
        problems.append("casts to DOUBLE (TensorRT casts it down to FLOAT)")
    return problems


# --------------------------------------------------------------------------- TensorRT and CUDA


def import_tensorrt():
    """The TensorRT Python module (``tensorrt``, or the bare ``tensorrt_bindings`` wheel)."""
    try:
        import tensorrt  # noqa: PLC0415

        return tensorrt
    except ImportError:
        pass
    try:
        import tensorrt_bindings as tensorrt  # noqa: PLC0415

        return tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(TENSORRT_MISSING) from e


def tensorrt_module_version() -> str:
    """Version of the installed TensorRT Python package, from its metadata when it has one
    (no import: the check runs at image build time, where no GPU driver is mounted)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu12-bindings"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return str(import_tensorrt().__version__)


def parse_ldd_libnvinfer(ldd_output: str) -> str | None:
    """Path of libnvinfer.so.N that ``ldd`` resolved, or None."""
    match = re.search(r"^\s*libnvinfer\.so\.\d+\s*=>\s*(\S+)", ldd_output, flags=re.M)
    return match.group(1) if match else None


def library_version(path: str | Path) -> str | None:
    """``10.5.0`` from a resolved ``libnvinfer.so.10.5.0`` (the soname link's target)."""
    match = re.search(r"\.so\.(\d+\.\d+\.\d+)", os.path.realpath(str(path)))
    return match.group(1) if match else None


def triton_tensorrt_version(backend: Path = TRITON_TENSORRT_BACKEND) -> str | None:
    """TensorRT version that Triton's TensorRT backend links, or None outside the container."""
    if not backend.is_file():
        return None
    try:
        out = subprocess.run(["ldd", str(backend)], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot run ldd on %s: %s", backend, e)
        return None
    path = parse_ldd_libnvinfer(out)
    return library_version(path) if path else None


def same_release(a: str, b: str) -> bool:
    """Equal major.minor.patch (plans are not portable across TensorRT releases)."""
    return a.split(".")[:3] == b.split(".")[:3]


class CudaRuntime:
    """The few CUDA runtime calls the verification needs, through ctypes (no extra package).

    libcudart comes with the NGC containers; device memory here holds one verification batch.
    """

    _NAMES = ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0")
    _H2D, _D2H = 1, 2  # cudaMemcpyKind
    _CC_MAJOR, _CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor

    def __init__(self) -> None:
        candidates = [*self._NAMES, ctypes.util.find_library("cudart")]
        candidates += [str(p) for p in sorted(Path("/usr/local/cuda/lib64").glob("libcudart.so*"))]
        for name in filter(None, candidates):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise TensorRTUnavailable("CUDA runtime (libcudart) not found: run this inside the NGC tritonserver container")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"{call} failed: {self.lib.cudaGetErrorString(status).decode()} (cudaError {status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        src = array.ctypes.data_as(ctypes.c_void_p)
        self._check(self.lib.cudaMemcpy(ctypes.c_void_p(ptr), src, ctypes.c_size_t(array.nbytes), self._H2D), "cudaMemcpy H2D")

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        dst = array.ctypes.data_as(ctypes.c_void_p)
        self._check(self.lib.cudaMemcpy(dst, ctypes.c_void_p(ptr), ctypes.c_size_t(array.nbytes), self._D2H), "cudaMemcpy D2H")

    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        return int(stream.value or 0)

    def stream_synchronize(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        self._check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def device(self) -> dict[str, Any]:
        """Current device: index, name, compute capability (plans are specific to it)."""
        index, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cudaGetDevice(ctypes.byref(index)), "cudaGetDevice")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), self._CC_MAJOR, index), "cudaDeviceGetAttribute")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), self._CC_MINOR, index), "cudaDeviceGetAttribute")
        props = ctypes.create_string_buffer(4096)  # cudaDeviceProp starts with char name[256]
        getter = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties
        name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") if getter(props, index) == 0 else "unknown"
        return {"index": index.value, "name": name, "compute_capability": f"{major.value}.{minor.value}"}


class Runner(Protocol):
    """Runs one model on named numpy inputs and returns its outputs by name."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeRunner:
    """The reference: ONNX Runtime, CPU execution provider, FP32."""

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, dict(feeds)), strict=True))


class TensorRTRunner:
    """A deserialized plan run with the TensorRT 10 tensor API (set_input_shape / execute_async_v3)."""

    def __init__(self, trt, plan: bytes, logger, cuda: CudaRuntime | None = None) -> None:
        self.trt = trt
        self.cuda = cuda or CudaRuntime()
        self.runtime = trt.Runtime(logger)  # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise PlanError("TensorRT could not deserialize the plan it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cuda, ctx = self.trt, self.cuda, self.context
        pointers: list[int] = []
        stream = cuda.stream_create()
        try:
            for name in self.inputs:
                array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                if not ctx.set_input_shape(name, array.shape):
                    raise PlanError(f"input {name} shape {array.shape} is outside the plan's optimization profile")
                pointers.append(cuda.malloc(array.nbytes))
                cuda.to_device(pointers[-1], array)
                ctx.set_tensor_address(name, pointers[-1])
            results = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                results[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                pointers.append(cuda.malloc(results[name].nbytes))
                ctx.set_tensor_address(name, pointers[-1])
            if not ctx.execute_async_v3(stream):
                raise PlanError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            cuda.stream_synchronize(stream)
            for name, ptr in zip(self.outputs, pointers[len(self.inputs):], strict=True):
                cuda.to_host(results[name], ptr)
            return results
        finally:
            for ptr in pointers:
                cuda.free(ptr)
            cuda.stream_destroy(stream)


# --------------------------------------------------------------------------- samples and verification


SYNTHETIC_SOURCE = "synthetic patient (wff.training.synth, seed {seed})"


def _synthetic_patient(out: Path, seed: int) -> Path:
    """Write one synthetic patient's DICOM series (wff.training.synth) under ``out``; returns its folder."""
    from wff.training.synth import draw_patients, write_patient

    patient = draw_patients(2, 2, np.random.default_rng(seed))[0]  # the smallest draw: 2 train + 2 test
    write_patient(out, patient, seed)
    return out / patient.patient_id


def _spread(n: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over 0..n-1 (repeating when count > n)."""
    return np.linspace(0, n - 1, count).round().astype(np.int64)


def patient_samples(repository: str | Path, patient: str | Path | None = None, batch: int = DEFAULT_VERIFY_BATCH,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Verification inputs of both plans from one patient, prepared as the served ensemble prepares them.

    ``patient`` is a folder of one patient's DICOM series; without it a synthetic patient
    (wff.training.synth, ``seed``) is written to a temporary folder. With the repository's
    profile.json, the preprocess step's functions read and letterbox the series; the detector
    inputs are ``batch`` of those slices, spread evenly over the patient. The repository's
    detector ``model.onnx`` (ONNX Runtime) then runs on every slice and the crop step cuts the
    served clip of each series; when the patient has fewer series than ``batch``, further clips
    of the same regions, centred one clip length further along each series, fill the batch.

    Returns ``{detector input: (batch, 1, S, S), classifier input: (batch, 1, N, C, C)}``,
    float32 in [0, 1]. Raises :class:`PlanError` for a repository without profile.json or a
    folder the preprocess step refuses.
    """
    from wff.config import ServingConfig
    from wff.contracts import contracts_for
    from wff.ensemble import steps
    from wff.ensemble.crop import clip_indices, crop_clip, expand_box
    from wff.ensemble.dicom_series import read_study_dir
    from wff.ensemble.pipeline import run_batched
    from wff.ensemble.preprocess import prepare_patient
    from wff.ensemble.types import InputError

    if batch < 1:
        raise ValueError(f"verification batch must be >= 1, got {batch}")
    repository = Path(repository)
    profile = _repository_profile(repository)
    if profile is None:
        raise PlanError(f"{repository}: no profile.json in the repository, so its slices cannot be prepared; "
                        f"rebuild it with `wff repo build --target tensorrt`, or pass an npz with --samples")
    # a given folder must pass the served request limits; the synthetic patient (up to 84 slices)
    # is read under the default limits, so a profile with smaller ones still gets its samples
    limits = profile.serving if patient is not None else ServingConfig()
    with tempfile.TemporaryDirectory(prefix="wff-trt-samples-") as tmp:
        folder = Path(patient) if patient is not None else _synthetic_patient(Path(tmp), seed)
        try:
            prepared = prepare_patient(read_study_dir(folder, limits), profile.image)
        except InputError as e:
            raise PlanError(f"verification samples: {e}") from e

    c = contracts_for(profile)
    (image,) = c.detector.inputs
    (clip,) = c.classifier.inputs
    detector = OnnxRuntimeRunner(_latest_version_dir(repository / c.detector.name) / ONNX_FILE)
    detections = run_batched(lambda b: detector.run({image.name: b}), prepared.slices, c.detector.max_batch_size)
    # route preprocess and detector outputs into the crop step by the ensemble wiring
    wiring = {step: (in_map, out_map) for step, in_map, out_map in c.wiring}
    tensors: dict[str, np.ndarray] = {}
    for step, outputs in (("preprocess", steps.preprocess_outputs(prepared, float("nan"), {})), ("detector", detections)):
        tensors.update({wiring[step][1][k]: v for k, v in outputs.items() if k in wiring[step][1]})
    cropped = steps.crop({k: tensors[v] for k, v in wiring["crop"][0].items()}, profile)
    clips = [cropped["crop_clips"]]  # (Q, 1, N, C, C): the clips the classifier gets when serving
    cfg = profile.classifier
    for k in range(batch - len(clips[0])):
        q = k % len(clips[0])
        members = np.flatnonzero(prepared.slice_series == q)  # (n,) slices of series q
        centre, *box = cropped["crop_regions"][q]
        centre = (int(centre) + (k // len(clips[0]) + 1) * cfg.clip_len) % members.size
        box = expand_box(tuple(box), cfg.crop_margin, profile.image.size)
        clips.append(crop_clip(prepared.slices[members, 0], box, clip_indices(members.size, centre, cfg.clip_len), cfg.crop_size)[None, None])
    return {
        image.name: np.ascontiguousarray(prepared.slices[_spread(len(prepared.slices), batch)]),
        clip.name: np.ascontiguousarray(np.concatenate(clips)[:batch]),
    }


def verification_inputs(repository: str | Path, samples: str | Path | None = None,
                        batch: int = DEFAULT_VERIFY_BATCH) -> tuple[dict[str, np.ndarray], str]:
    """The arrays plans are verified on, by input name, and where they come from.

    ``samples``: an npz file (arrays named after the inputs), a patient folder of DICOM series,
    or None for a synthetic patient (:func:`patient_samples`).
    """
    if samples is not None and Path(samples).is_file():
        with np.load(samples) as data:
            return {name: data[name] for name in data.files}, str(samples)
    if samples is not None:
        return patient_samples(repository, samples, batch), f"patient folder {samples}"
    return patient_samples(repository, None, batch), SYNTHETIC_SOURCE.format(seed=0)


def load_samples(spec: PlanSpec, arrays: Mapping[str, np.ndarray], batch: int = DEFAULT_VERIFY_BATCH,
                 origin: str = "samples") -> dict[str, np.ndarray]:
    """``spec``'s verification inputs from ``arrays`` (see :func:`verification_inputs`): the first
    ``batch`` items of the array named after each input, FP32 (B, *dims)."""
    if batch < 1:
        raise ValueError(f"verification batch must be >= 1, got {batch}")
    samples = {}
    for profile in spec.inputs:
        dims = profile.max[1:]
        if profile.name not in arrays:
            raise PlanError(f"{origin}: no array {profile.name!r}; it has {sorted(arrays)}")
        array = np.asarray(arrays[profile.name], dtype=np.float32)[:batch]
        if array.shape[1:] != dims or len(array) == 0:
            raise PlanError(f"{origin}: {profile.name} is {array.shape}, expected (B, {', '.join(map(str, dims))})")
        samples[profile.name] = array
    return samples


@dataclass
class Verification:
    precision: str
    tolerance: dict[str, Any]
    batches: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.batches)

    @property
    def max_abs_diff(self) -> dict[str, float | None]:
        """Largest difference per continuous output over all batches."""
        worst: dict[str, float | None] = {}
        for c in self.batches:
            for name, diff in c.max_abs_diff.items():
                prev = worst.get(name)
                worst[name] = diff if prev is None else (prev if diff is None else max(prev, diff))
        return worst

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "tolerance": self.tolerance,
            "max_abs_diff": self.max_abs_diff,
            "batches": [{**asdict(c), "passed": c.passed} for c in self.batches],
        }


def verify_plan(
    spec: PlanSpec,
    plan_runner: Runner,
    reference: Runner,
    samples: Mapping[str, np.ndarray],
    precision: str,
    tolerance: Tolerance | None = None,
) -> Verification:
    """Run ``samples`` through the plan and the reference in batches of at most max_batch_size,
    then the first sample alone (batch 1), and compare each batch (:func:`compare_outputs`)."""
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    tolerance = tolerance or TOLERANCES[precision]
    total = len(next(iter(samples.values())))
    chunks = [slice(i, min(i + spec.max_batch_size, total)) for i in range(0, total, spec.max_batch_size)]
    if total > 1:
        chunks.append(slice(0, 1))
    comparisons = []
    for chunk in chunks:
        feeds = {name: np.ascontiguousarray(array[chunk]) for name, array in samples.items()}
        comparisons.append(compare_outputs(reference.run(feeds), plan_runner.run(feeds), spec.discrete_outputs, tolerance))
    return Verification(precision, {"atol": dict(tolerance.atol), "default_atol": tolerance.default_atol,
                                    "max_misaligned": tolerance.max_misaligned}, comparisons)


# --------------------------------------------------------------------------- build


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _up_to_date(spec: PlanSpec, onnx_hash: str, trt_version: str, precision: str, device: Mapping[str, Any]) -> bool:
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
    this precision, on this GPU model (what :func:`_up_to_date` compares)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", str(device.get("name", "")).lower()).strip("-")
    return Path(cache) / spec.step / f"{onnx_hash[:16]}-trt{trt_version}-{precision}-{gpu}-cc{device.get('compute_capability')}"


def _restore_plan(entry: Path, spec: PlanSpec) -> bool:
    """Copy a cached plan and its report beside ``spec.onnx``; False when the cache has none."""
    plan, report = entry / PLAN_FILE, entry / (PLAN_FILE + REPORT_SUFFIX)
    if not (plan.is_file() and report.is_file()):
        return False
    for source, target in ((plan, spec.plan), (report, spec.report)):
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    return True


def _store_plan(entry: Path, spec: PlanSpec) -> None:
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


def preflight(repository: str | Path, models: Sequence[str] = MODEL_STEPS) -> list[tuple[PlanSpec, list[str]]]:
    """Specs and op issues of ``models``; raises :class:`PlanError` on the first broken spec."""
    table = load_ops_table()
    return [(spec, onnx_tensorrt_issues(spec.onnx, table)) for spec in (plan_spec(repository, m) for m in models)]


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
        if not force and _up_to_date(spec, onnx_hash, trt_version, precision, device):
            log.info("%s: %s is up to date (TensorRT %s, %s)", spec.step, spec.plan, trt_version, precision)
            reports.append(json.loads(spec.report.read_text()))
            continue
        entry = plan_cache_entry(plan_cache, spec, onnx_hash, trt_version, precision, device) if plan_cache else None
        if (entry is not None and not force and _restore_plan(entry, spec)
                and _up_to_date(spec, onnx_hash, trt_version, precision, device)):
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
            _store_plan(entry, spec)
    return reports


__all__ = [
    "MODEL_STEPS", "PRECISIONS", "TOLERANCES", "Tolerance", "Comparison", "compare_outputs", "InputProfile", "PlanSpec",
    "profile_shapes", "choose_opt_batch", "tensorrt_module_version", "triton_tensorrt_version", "plan_spec",
    "onnx_tensorrt_issues", "load_ops_table", "import_tensorrt",
    "TensorRTUnavailable", "PlanError", "verify_plan", "load_samples", "patient_samples",
    "verification_inputs", "build_plans", "preflight", "trtexec_command", "plan_cache_entry", "PLAN_CACHE_ENV",
]
