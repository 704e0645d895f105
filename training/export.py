"""ONNX export of the detector and the sequence classifier, named by wff.contracts.

Both graphs are exported with the ``torch.export``-based exporter (``dynamo=True``) at opset
18, its native opset (no version conversion), which TensorRT 10's ONNX parser and ONNX
Runtime both take; only dim 0 (named ``batch``) is dynamic. A model with deformable
convolutions (the paper's ``resnext101_dcn``) is exported at opset 19, the first with the
ONNX ``DeformConv`` op; ONNX Runtime runs it. The TorchScript exporter
(``dynamo=False``, opset 17) also exports DetectorGraph and passes the parity check, but it
traces ``x.shape`` reads into about 60 Shape/Gather/ConstantOfShape nodes and declares the
detector outputs as ``(batch, ?, ?)``; the dynamo graph has every non-batch dim static. Tensor names, ranks, fixed dims and dtypes are read from
``contracts_for(profile)`` and checked on the written file, so a graph that would not match
its Triton config is never left behind.

``check_onnx`` compares ONNX Runtime with PyTorch on the given inputs (and on their first
item alone, so both batch 1 and batch > 1 run through the dynamic axis).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import DeformConv2d

from wff.config import Profile
from wff.contracts import StepContract, contracts_for
from wff.training.detector_graph import DetectorGraph

log = logging.getLogger(__name__)

OPSET = 18
OPSET_DEFORM = 19  # ONNX DeformConv exists from opset 19 on
BATCH_AXIS = "batch"
MAX_BATCH = 4096  # upper bound of the symbolic batch dim (torch.export needs one)
EXPORT_BATCH = 2  # example batch for tracing; any size works afterwards
FORBIDDEN_OPS = frozenset({"NonZero", "Loop", "If", "NonMaxSuppression", "Scan"})  # dynamic-shape ops

_ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT32: "TYPE_INT32"}


class OnnxParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


def _export(module: nn.Module, example: torch.Tensor, contract: StepContract, path: Path) -> set[str]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names_in = [s.name for s in contract.inputs]
    names_out = [s.name for s in contract.outputs]
    module = module.eval()
    opset = OPSET_DEFORM if any(isinstance(m, DeformConv2d) for m in module.modules()) else OPSET
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            input_names=names_in,
            output_names=names_out,
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    _check_signature(model, contract, path)
    ops = onnx_op_types(model)
    bad = sorted(ops & FORBIDDEN_OPS)
    if bad:
        raise RuntimeError(f"{path}: exported graph has dynamic-shape ops {bad}; TensorRT needs a static graph")
    log.info("exported %s (%s): ops %s", path, contract.name, sorted(ops))
    return ops


def _check_signature(model: onnx.ModelProto, contract: StepContract, path: Path) -> None:
    """Names, dtypes and dims of the graph's inputs/outputs against the contract (batch dim first)."""
    for kind, specs, values in (("input", contract.inputs, model.graph.input), ("output", contract.outputs, model.graph.output)):
        got = {v.name: v for v in values}
        if [v.name for v in values] != [s.name for s in specs]:
            raise RuntimeError(f"{path}: {kind}s {[v.name for v in values]}, contract says {[s.name for s in specs]}")
        for spec in specs:
            t = got[spec.name].type.tensor_type
            dtype = _ONNX_TO_TRITON.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type))
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            want = (-1, *spec.dims) if contract.max_batch_size > 0 else spec.dims
            if dtype != spec.data_type or dims != want:
                raise RuntimeError(f"{path}: {kind} {spec.name} is {dtype} {dims}, contract says {spec.data_type} {want}")


def export_detector(model: FasterRCNN | DetectorGraph, profile: Profile, path: str | Path) -> set[str]:
    """Export the detector as its static DetectorGraph to ``path``; returns the graph's op types.

    ``detector_image`` (batch, 1, S, S) float32 -> ``detector_boxes`` (batch, K, 4),
    ``detector_scores``, ``detector_labels`` (int32), ``detector_malignancy`` (batch, K),
    ``detector_count`` (batch, 1) int32; see DetectorGraph. The model is moved to CPU and
    set to eval mode. Opset 18, or 19 when the backbone has deformable convolutions.
    """
    graph = model if isinstance(model, DetectorGraph) else DetectorGraph(model.cpu().eval(), profile)
    graph = graph.cpu().eval()
    size = profile.image.size
    example = torch.rand(EXPORT_BATCH, 1, size, size)
    return _export(graph, example, contracts_for(profile).detector, Path(path))


def export_classifier(model: nn.Module, profile: Profile, path: str | Path) -> set[str]:
    """Export the sequence classifier to ``path``; returns the graph's op types.

    ``classifier_clip`` (batch, 1, N, C, C) float32 -> ``classifier_probs`` (batch, 2) float32
    softmax (P benign, P malignant). The model is moved to CPU and set to eval mode.
    """
    c = profile.classifier
    example = torch.rand(EXPORT_BATCH, 1, c.clip_len, c.crop_size, c.crop_size)
    return _export(model.cpu().eval(), example, contracts_for(profile).classifier, Path(path))


def onnx_op_types(model: str | Path | onnx.ModelProto) -> set[str]:
    """Op types of an ONNX graph (including nested subgraphs, of which ours have none)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ops: set[str] = set()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            ops.add(node.op_type)
            stack.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
            stack.extend(a.graphs for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS)
    return ops


def ort_session(path: str | Path, threads: int = 2):
    """ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path, module: nn.Module, inputs: torch.Tensor, atol: float, threads: int = 2) -> float:
    """Max abs difference between ONNX Runtime and ``module`` over every output.

    ``inputs`` is one batch (B, ...) float32; the check runs on it and, when B > 1, on its
    first item alone. Outputs are compared in graph order with the module's tuple (or single
    tensor) output, dtypes included. Raises :class:`OnnxParityError` naming the output and
    batch size when an output differs by more than ``atol``.
    """
    session = ort_session(path, threads)
    (input_name,) = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    module = module.cpu().eval()
    batches = [inputs] if len(inputs) == 1 else [inputs, inputs[:1]]
    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            expected = module(batch.cpu())
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(output_names, {input_name: batch.cpu().numpy().astype(np.float32)})
        if len(got) != len(expected):
            raise OnnxParityError(f"{path}: ONNX has {len(got)} outputs, the module {len(expected)}")
        for name, ref, out in zip(output_names, expected, got):
            ref = ref.cpu().numpy()
            if ref.dtype != out.dtype or ref.shape != out.shape:
                raise OnnxParityError(f"{path}: {name} is {out.dtype} {out.shape} in ONNX Runtime, {ref.dtype} {ref.shape} in PyTorch")
            diff = float(np.abs(ref.astype(np.float64) - out.astype(np.float64)).max()) if ref.size else 0.0
            if not diff <= atol:
                raise OnnxParityError(f"{path}: {name} differs by {diff:.3g} > atol {atol:g} at batch {len(batch)}")
            worst = max(worst, diff)
    return worst


__all__ = ["export_detector", "export_classifier", "check_onnx", "onnx_op_types", "ort_session", "OnnxParityError", "OPSET", "OPSET_DEFORM", "FORBIDDEN_OPS"]
