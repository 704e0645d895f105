"""crop: one clip per series from its largest detected region (wff.ensemble.steps.crop)."""

from wff.config import load_profile
from wff.ensemble import steps
from wff.serving.triton_step import TritonStep


class TritonPythonModel(TritonStep):
    def setup(self) -> None:
        self.profile = load_profile(self.version_dir / "profile.json")

    def run(self, inputs):
        n = len(inputs["crop_slices"])
        for name in ("crop_slice_series", "crop_boxes", "crop_scores", "crop_count"):
            if len(inputs[name]) != n:
                raise ValueError(f"{name} has {len(inputs[name])} rows for {n} slices")
        return steps.crop(inputs, self.profile)
