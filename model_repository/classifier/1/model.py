"""classifier (embedded target): ONNX Runtime over model.onnx in this version directory.

Triton's dynamic batcher merges requests; TritonStep concatenates their batches into one
session run. Intra-op threads: config parameter ``runtime_threads``, else the profile's.
"""

from wff.config import load_profile
from wff.contracts import contracts_for
from wff.ensemble.runtime import OnnxRunner
from wff.serving.triton_step import TritonStep


class TritonPythonModel(TritonStep):
    def setup(self) -> None:
        profile = load_profile(self.version_dir / "profile.json")
        threads = int(self.parameter("runtime_threads", str(profile.serving.runtime_threads)))
        self.runner = OnnxRunner(self.version_dir / "model.onnx", contracts_for(profile).classifier, threads)

    def run(self, inputs):
        return self.runner(inputs[self.runner.input_spec.name])
