"""fusion: Eq. 1 per image and the majority votes, with the served strategy's weights (wff.ensemble.steps.fusion).

Weights and the detection threshold come from fusion.json, the age groups from age_prior.json,
both in the version directory; the same numbers are in this model's config parameters for clients.
Each diagnosis counts in ``wff_diagnoses_total{diagnosis}``.
"""

from wff.ensemble import steps
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import load_fusion_settings
from wff.serving.triton_step import TritonStep


class TritonPythonModel(TritonStep):
    def setup(self) -> None:
        self.settings = load_fusion_settings(self.version_dir / "fusion.json")
        self.age_prior = AgePrior.load(self.version_dir / "age_prior.json")

    def run(self, inputs):
        n = len(inputs["fusion_scores"])
        for name in ("fusion_boxes", "fusion_malignancy", "fusion_count", "fusion_slice_series"):
            if len(inputs[name]) != n:
                raise ValueError(f"{name} has {len(inputs[name])} rows for {n} slices")
        series = inputs["fusion_slice_series"]
        if n and (series.min() < 0 or series.max() >= len(inputs["fusion_series_probs"])):
            raise ValueError(f"fusion_slice_series must index the {len(inputs['fusion_series_probs'])} series")
        outputs = steps.fusion(inputs, self.settings, self.age_prior)
        self.count("wff_diagnoses_total", diagnosis=outputs["fusion_diagnosis"][0].decode())
        return outputs
