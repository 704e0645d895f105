"""The embedded target's detector and classifier: a CPU runtime over model.onnx in the version dir.

Triton's dynamic batcher merges requests; TritonStep concatenates their batches into one
session run. The step's contract is looked up by the model's name, so one class serves both.
Runtime (ONNX Runtime or OpenVINO), its precision, threads and items per run: config parameters
``runtime``, ``runtime_precision``, ``runtime_threads`` and ``runtime_chunk``, else the profile's
serving section. The runtime is run once at every batch size it can get before the model reports
ready (wff.ensemble.runtime.warm_up).
"""

import time

import triton_python_backend_utils as pb_utils

from wff.config import load_profile
from wff.contracts import contracts_for
from wff.ensemble.runtime import make_runner, warm_up
from wff.serving.triton_step import TritonStep


class OnnxRuntimeStep(TritonStep):
    def setup(self) -> None:
        profile = load_profile(self.version_dir / "profile.json")
        threads = int(self.parameter("runtime_threads", str(profile.serving.runtime_threads)))
        chunk = int(self.parameter("runtime_chunk", str(profile.serving.runtime_chunk)))
        contract = contracts_for(profile).step(self.model_name)
        runtime = self.parameter("runtime", profile.serving.runtime)
        precision = self.parameter("runtime_precision", profile.serving.runtime_precision)
        self.runner = make_runner(runtime, self.version_dir / "model.onnx", contract, threads, chunk, precision)
        started = time.monotonic()
        # every batch size one runtime call can get: the batcher's largest batch, cut into chunks of at most `chunk`
        sizes = warm_up(self.runner, min(chunk, self.model_config["max_batch_size"]))
        pb_utils.Logger.log_info(f"{self.model_name}: warmed at batch sizes 1-{sizes} in {time.monotonic() - started:.1f} s")

    def run(self, inputs):
        return self.runner(inputs[self.runner.input_spec.name])
