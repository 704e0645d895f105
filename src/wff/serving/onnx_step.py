"""The embedded target's detector and classifier: ONNX Runtime over model.onnx in the version dir.

Triton's dynamic batcher merges requests; TritonStep concatenates their batches into one
session run. The step's contract is looked up by the model's name, so one class serves both.
Intra-op threads: config parameter ``runtime_threads``, else the profile's.
"""

from wff.config import load_profile
from wff.contracts import contracts_for
from wff.ensemble.runtime import OnnxRunner
from wff.serving.triton_step import TritonStep


class OnnxRuntimeStep(TritonStep):
    def setup(self) -> None:
        profile = load_profile(self.version_dir / "profile.json")
        threads = int(self.parameter("runtime_threads", str(profile.serving.runtime_threads)))
        contract = contracts_for(profile).step(self.model_name)
        self.runner = OnnxRunner(self.version_dir / "model.onnx", contract, threads)

    def run(self, inputs):
        return self.runner(inputs[self.runner.input_spec.name])
