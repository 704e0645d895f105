"""The exported model of one batching step (detector or classifier) on a CPU runtime, checked against its contract.

* :class:`OnnxRunner`: ONNX Runtime, ``threads`` intra-op threads, all graph optimisations,
  sequential execution. The in-process pipeline and the embedded target's default.
* :class:`OpenVinoRunner`: OpenVINO's CPU plugin over the same model.onnx, latency hint,
  ``threads`` threads. In fp32 (the default) it is ~1.3x faster than ONNX Runtime on the small
  profile's detector and matches it to 6e-5 on boxes. ``precision="bf16"`` asks for bfloat16
  arithmetic (OpenVINO keeps fp32 where the CPU lacks it, and for the ops it never lowers):
  faster on CPUs with AVX512-BF16 or AMX, but the outputs move by about 1e-2, so it is a
  choice to measure on the test set (``scripts/precision_check.sh``), not a free speed-up.

``serving.runtime`` and ``serving.runtime_precision`` choose for the embedded target (:func:`make_runner`).

``chunk`` bounds the items per session run. The dynamic batcher hands the detector whole
patients (up to serving.max_batch_detector slices, more when it merges requests), and ONNX
Runtime's arena keeps the largest activations it ever held: about 20 MiB per 256 px slice,
so 64 slices at once cost ~670 MiB resident against ~380 MiB in chunks of 16, at the same
speed per slice (measured on the small profile, 2 threads).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wff.contracts import StepContract

log = logging.getLogger(__name__)

# runtime element type names -> numpy dtype, for the types the contracts use
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}
_OV_TYPES = {"f32": np.float32, "i32": np.int32, "i64": np.int64}
PRECISIONS = {"onnxruntime": ("f32",), "openvino": ("f32", "bf16")}  # runtime -> the precisions it serves
RUNTIMES = tuple(PRECISIONS)


class OnnxRunner:
    """``runner(batch) -> {output name: array}`` for a step with one input tensor.

    ``batch`` has the contract's input dims with a leading batch dim when the step batches
    (``max_batch_size > 0``), e.g. detector (B, 1, S, S) float32. Outputs are keyed by the
    contract's output names, in the contract's dtypes, each with the same leading batch dim.
    """

    runtime = "onnxruntime"  # key of PRECISIONS

    def __init__(
        self, path: str | Path, contract: StepContract, threads: int, chunk: int | None = None, precision: str = "f32"
    ) -> None:
        check_runtime(self.runtime, precision)
        self.precision = precision
        if len(contract.inputs) != 1:
            raise ValueError(f"OnnxRunner serves steps with one input; {contract.name!r} has {len(contract.inputs)}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 (or None: the whole batch at once), got {chunk}")
        self.chunk = chunk if contract.max_batch_size > 0 else None
        self.path = Path(path)
        self.contract = contract
        self.input_spec = contract.inputs[0]
        self.output_names = [o.name for o in contract.outputs]
        try:
            self._load(threads)
        except Exception as e:  # each runtime raises its own exception types for missing/corrupt files
            raise ValueError(f"{self.path}: cannot load ONNX model for step {contract.name!r} ({e})") from e
        self._check_model(*self._signature())

    def _load(self, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _signature(self) -> tuple[dict, dict]:
        """({input name: numpy dtype or type text}, {output name: ...}) of the loaded model."""
        return ({i.name: _ORT_TYPES.get(i.type, i.type) for i in self.session.get_inputs()},
                {o.name: _ORT_TYPES.get(o.type, o.type) for o in self.session.get_outputs()})

    def _run(self, batch: np.ndarray) -> list:
        return self.session.run(self.output_names, {self.input_spec.name: np.ascontiguousarray(batch)})

    def _check_model(self, inputs: dict, outputs: dict) -> None:
        """The model's tensor names are the contract's; the input's element type is float32."""
        where = f"{self.path} (step {self.contract.name!r})"
        if set(inputs) != {self.input_spec.name}:
            raise ValueError(f"{where}: model inputs {sorted(inputs)}, contract expects [{self.input_spec.name!r}]")
        missing = [o.name for o in self.contract.outputs if o.name not in outputs]
        if missing:
            raise ValueError(f"{where}: model lacks outputs {missing}; it has {sorted(outputs)}")
        if inputs[self.input_spec.name] is not self.input_spec.numpy_dtype:
            raise ValueError(f"{where}: input type {inputs[self.input_spec.name]}, contract expects {self.input_spec.data_type}")
        for spec in self.contract.outputs:
            if outputs[spec.name] is not spec.numpy_dtype:
                log.warning("%s: output %s is %s; cast to %s", where, spec.name, outputs[spec.name], spec.data_type)

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
        if self.chunk is None or len(batch) <= self.chunk:
            values = self._run(batch)
        else:
            parts = [self._run(batch[i : i + self.chunk]) for i in range(0, len(batch), self.chunk)]
            values = [np.concatenate(p) for p in zip(*parts)]
        return {o.name: np.asarray(v).astype(o.numpy_dtype, copy=False) for o, v in zip(self.contract.outputs, values)}


def warm_up(runner, max_items: int) -> int:
    """Run ``runner`` once at every batch size from 1 to ``max_items`` on zeros; returns the runs made.

    A runtime allocates per input shape (OpenVINO compiles and caches kernels for each shape it
    meets; ONNX Runtime's arena grows to the largest): served, the batch sizes of the merged
    requests arrive in random order and the steps' memory kept growing for as long as rare sizes
    kept appearing. Warmed at load, the serving memory starts at its working size.
    """
    spec = runner.input_spec
    for n in range(1, max_items + 1):
        runner(np.zeros((n, *spec.dims), spec.numpy_dtype))
    return max_items


class OpenVinoRunner(OnnxRunner):
    """The same contract and chunking over OpenVINO's CPU plugin (f32 or bf16, one infer request)."""

    runtime = "openvino"

    def _load(self, threads: int) -> None:
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _signature(self) -> tuple[dict, dict]:
        wanted = {self.input_spec.name, *self.output_names}

        def types(ports) -> dict:
            out = {}
            for port in ports:  # a port can carry several tensor names once OpenVINO fuses ops; take the contract's
                names = port.get_names()
                name = next((n for n in sorted(names) if n in wanted), min(names))
                out[name] = _OV_TYPES.get(port.get_element_type().get_type_name(), port.get_element_type().get_type_name())
            return out

        return types(self.compiled.inputs), types(self.compiled.outputs)

    def _run(self, batch: np.ndarray) -> list:
        self.request.infer({self.input_spec.name: np.ascontiguousarray(batch)})
        return [self.request.get_tensor(name).data.copy() for name in self.output_names]


def make_runner(
    runtime: str, path: str | Path, contract: StepContract, threads: int, chunk: int | None = None, precision: str = "f32"
) -> OnnxRunner:
    """The runner of ``runtime`` (one of RUNTIMES) over ``path`` in ``precision`` (one of PRECISIONS[runtime])."""
    check_runtime(runtime, precision)
    runners = {r.runtime: r for r in (OnnxRunner, OpenVinoRunner)}
    return runners[runtime](path, contract, threads, chunk, precision)


def check_runtime(runtime: str, precision: str) -> None:
    """Raise ValueError naming the serving field when (runtime, precision) is not served."""
    if runtime not in RUNTIMES:
        raise ValueError(f"serving.runtime: unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    if precision not in PRECISIONS[runtime]:
        raise ValueError(
            f"serving.runtime_precision: runtime {runtime!r} computes in {PRECISIONS[runtime]}, got {precision!r}"
        )
