"""ONNX Runtime session for one batching step (detector or classifier), checked against its contract.

Used by the embedded Triton target (Python-backend detector/classifier) and by the in-process
pipeline, so both run the exported model the same way: CPU, ``threads`` intra-op threads, all
graph optimisations, sequential execution.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wff.contracts import StepContract

log = logging.getLogger(__name__)

# ONNX TensorProto element type -> numpy dtype, for the types the contracts use
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


class OnnxRunner:
    """``runner(batch) -> {output name: array}`` for a step with one input tensor.

    ``batch`` has the contract's input dims with a leading batch dim when the step batches
    (``max_batch_size > 0``), e.g. detector (B, 1, S, S) float32. Outputs are keyed by the
    contract's output names, in the contract's dtypes, each with the same leading batch dim.
    """

    def __init__(self, path: str | Path, contract: StepContract, threads: int) -> None:
        import onnxruntime as ort

        if len(contract.inputs) != 1:
            raise ValueError(f"OnnxRunner serves steps with one input; {contract.name!r} has {len(contract.inputs)}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.path = Path(path)
        self.contract = contract
        self.input_spec = contract.inputs[0]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for missing/corrupt files
            raise ValueError(f"{self.path}: cannot load ONNX model for step {contract.name!r} ({e})") from e
        self._check_model()
        self.output_names = [o.name for o in contract.outputs]

    def _check_model(self) -> None:
        """The model's tensor names are the contract's; the input's element type is float32."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        where = f"{self.path} (step {self.contract.name!r})"
        if set(inputs) != {self.input_spec.name}:
            raise ValueError(f"{where}: model inputs {sorted(inputs)}, contract expects [{self.input_spec.name!r}]")
        missing = [o.name for o in self.contract.outputs if o.name not in outputs]
        if missing:
            raise ValueError(f"{where}: model lacks outputs {missing}; it has {sorted(outputs)}")
        model_type = _ORT_TYPES.get(inputs[self.input_spec.name].type)
        if model_type is not self.input_spec.numpy_dtype:
            raise ValueError(f"{where}: input type {inputs[self.input_spec.name].type}, contract expects {self.input_spec.data_type}")
        for spec in self.contract.outputs:
            if _ORT_TYPES.get(outputs[spec.name].type) is not spec.numpy_dtype:
                log.warning("%s: output %s is %s; cast to %s", where, spec.name, outputs[spec.name].type, spec.data_type)

    def _check_input(self, batch: np.ndarray) -> None:
        spec = self.input_spec
        expected = ((-1,) if self.contract.max_batch_size > 0 else ()) + spec.dims
        if not isinstance(batch, np.ndarray):
            raise ValueError(f"{spec.name}: expected a numpy array, got {type(batch).__name__}")
        if batch.dtype != spec.numpy_dtype:
            raise ValueError(f"{spec.name}: dtype {batch.dtype}, expected {np.dtype(spec.numpy_dtype)}")
        if batch.ndim != len(expected) or any(e != -1 and e != d for e, d in zip(expected, batch.shape)):
            shown = tuple("B" if i == 0 and self.contract.max_batch_size > 0 else ("*" if d == -1 else d) for i, d in enumerate(expected))
            raise ValueError(f"{spec.name}: shape {batch.shape}, expected {shown}")

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self._check_input(batch)
        if batch.shape[0] == 0 and self.contract.max_batch_size > 0:
            return {o.name: np.zeros((0, *(max(d, 0) for d in o.dims)), o.numpy_dtype) for o in self.contract.outputs}
        values = self.session.run(self.output_names, {self.input_spec.name: np.ascontiguousarray(batch)})
        return {o.name: np.asarray(v).astype(o.numpy_dtype, copy=False) for o, v in zip(self.contract.outputs, values)}
