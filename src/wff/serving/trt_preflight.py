"""Preflight of a TensorRT plan build: what each plan must be, and whether TensorRT 10 can build it.

Runs anywhere (no TensorRT needed; ``wff trt check``). For each of ``detector`` and
``classifier`` (:data:`MODEL_STEPS`), :func:`plan_spec` reads the step's config.pbtxt, which
must say ``platform: "tensorrt_plan"``; its max_batch_size, dims and preferred batch sizes give
the optimization profile (:func:`profile_shapes`), cross-checked against ``model.onnx``'s
signature and, when the repository holds a profile.json, against ``wff.contracts``.
:func:`onnx_tensorrt_issues` checks every op of the graph against ``tensorrt_onnx_ops.json``
(TensorRT 10's ONNX parser).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODEL_STEPS = ("detector", "classifier")  # the exported networks; the Python steps have no plan
PLATFORM = "tensorrt_plan"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
REPORT_SUFFIX = ".json"  # model.plan -> model.plan.json
OPS_FILE = "tensorrt_onnx_ops.json"

# ONNX element types allowed at a plan's inputs/outputs (the Triton contracts use FP32 and INT32).
_IO_TYPES = {1: "TYPE_FP32", 6: "TYPE_INT32"}
_DOUBLE = 11  # onnx.TensorProto.DOUBLE


class PlanError(RuntimeError):
    """A repository, graph or plan that cannot become (or is not) a correct TensorRT plan."""


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


def latest_version_dir(model_dir: Path) -> Path:
    versions = sorted((int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) if model_dir.is_dir() else []
    if not versions:
        raise PlanError(f"{model_dir}: no numeric version folder (e.g. 1/)")
    return versions[-1][1]


def repository_profile(repository: Path):
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
    version_dir = latest_version_dir(model_dir)
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
    profile = repository_profile(repository)
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


def preflight(repository: str | Path, models: Sequence[str] = MODEL_STEPS) -> list[tuple[PlanSpec, list[str]]]:
    """Specs and op issues of ``models``; raises :class:`PlanError` on the first broken spec."""
    table = load_ops_table()
    return [(spec, onnx_tensorrt_issues(spec.onnx, table)) for spec in (plan_spec(repository, m) for m in models)]


__all__ = [
    "MODEL_STEPS", "PlanError", "InputProfile", "PlanSpec", "read_model_config", "choose_opt_batch", "profile_shapes",
    "latest_version_dir", "repository_profile", "plan_spec", "load_ops_table", "onnx_tensorrt_issues", "preflight",
]
