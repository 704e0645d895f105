"""classifier (embedded target): ONNX Runtime over model.onnx in this version directory (wff.serving.onnx_step)."""

from wff.serving.onnx_step import OnnxRuntimeStep as TritonPythonModel  # noqa: F401
