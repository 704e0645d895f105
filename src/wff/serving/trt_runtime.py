"""TensorRT and CUDA on the build machine: the TensorRT module and its version against Triton's
TensorRT backend, the few CUDA runtime calls a verification needs, and the runners that execute
one model on numpy inputs (a deserialized plan, or ONNX Runtime as the reference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wff.serving.trt_preflight import PlanError

log = logging.getLogger(__name__)

TRITON_TENSORRT_BACKEND = Path("/opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so")
TENSORRT_MISSING = "TensorRT is not installed: run this inside the NGC tritonserver container, see docker/README.md"


class TensorRTUnavailable(RuntimeError):
    """The TensorRT Python API (or the CUDA runtime) cannot be imported on this machine."""


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



__all__ = [
    "TRITON_TENSORRT_BACKEND", "TensorRTUnavailable", "import_tensorrt", "tensorrt_module_version", "parse_ldd_libnvinfer",
    "library_version", "triton_tensorrt_version", "same_release", "CudaRuntime", "Runner", "OnnxRuntimeRunner",
    "TensorRTRunner",
]
