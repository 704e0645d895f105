"""The in-process pipeline routes tensors like the ensemble and runs the shared steps."""

import numpy as np
import pytest

from wff.config import AgePriorConfig, Profile
from wff.contracts import contracts_for
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import FusionSettings
from wff.ensemble.pipeline import Pipeline, run_batched
from wff.ensemble.steps import preprocess_outputs, request_age
from wff.ensemble.types import InputError, PreparedPatient

PROFILE = Profile().replace(image={"size": 32}, detector={"top_k": 3}, classifier={"clip_len": 4, "crop_size": 8})


def fake_detector(batch):
    """Every slice: one box at a fixed place, malignancy = mean intensity of the slice."""
    n = len(batch)
    boxes = np.zeros((n, 3, 4), np.float32)
    boxes[:, 0] = (4, 4, 12, 12)
    scores = np.zeros((n, 3), np.float32)
    scores[:, 0] = 0.9
    malig = np.zeros((n, 3), np.float32)
    malig[:, 0] = batch.reshape(n, -1).mean(axis=1)
    return {"detector_boxes": boxes, "detector_scores": scores, "detector_labels": np.ones((n, 3), np.int32),
            "detector_malignancy": malig, "detector_count": np.ones((n, 1), np.int32)}


def fake_classifier(clips):
    p = clips.reshape(len(clips), -1).mean(axis=1)
    return {"classifier_probs": np.stack([1 - p, p], axis=1).astype(np.float32)}


def prepared(values):
    """One series per value, 3 slices each filled with that value."""
    slices = np.concatenate([np.full((3, 1, 32, 32), v, np.float32) for v in values])
    series = np.repeat(np.arange(len(values)), 3).astype(np.int32)
    info = tuple({"index": i, "sequence": "T2"} for i in range(len(values)))
    return PreparedPatient(slices, series, (1.0,) * len(values), info)


class TestPipeline:
    def test_components_follow_the_routed_tensors(self):
        """D, M and the votes come from the stand-in models through crop and fusion."""
        prior = AgePrior.fit(np.array([30.0, 70.0]), np.array([0, 1]), AgePriorConfig())
        pipe = Pipeline(PROFILE, fake_detector, fake_classifier, FusionSettings(), prior)
        dx = pipe.run_from_preprocessed(preprocess_outputs(prepared([0.9, 0.8, 0.2]), 70.0, {}))
        np.testing.assert_allclose(dx.slice_d, [0.9] * 3 + [0.8] * 3 + [0.2] * 3, rtol=1e-6)
        np.testing.assert_allclose(dx.series_m, [0.9, 0.8, 0.2], rtol=1e-5)
        np.testing.assert_array_equal(dx.series_votes, [1, 1, 0])
        assert dx.label == "malignant" and dx.age_used == 70.0 and dx.age_a == pytest.approx(prior(70.0))

    def test_batches_split_at_max_batch(self):
        """run_batched concatenates chunk outputs in order."""
        calls = []

        def runner(x):
            calls.append(len(x))
            return {"y": x * 2}

        out = run_batched(runner, np.arange(10), 4)
        assert calls == [4, 4, 2] and out["y"].tolist() == list(range(0, 20, 2))

    def test_contract_dims_match_profile(self):
        """The contracts carry the profile's S, K, N and C."""
        c = contracts_for(PROFILE)
        assert c.detector.input("detector_image").dims == (1, 32, 32)
        assert c.crop.output("crop_clips").dims == (-1, 1, 4, 8, 8)


class TestRequestAge:
    @pytest.mark.parametrize("value", [float("nan"), -3.0, 200.0])
    def test_bad_age_is_input_error(self, value):
        """NaN or out-of-range ages are rejected as bad input."""
        with pytest.raises(InputError, match="AGE_YEARS"):
            request_age(np.array([value], np.float32), 120)

    def test_empty_age_means_not_given(self):
        """A zero-element AGE_YEARS means no age in the request."""
        assert request_age(np.zeros((0,), np.float32), 120) is None
