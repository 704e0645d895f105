"""wff.serving.trt_verify: the tolerance logic (with a fake engine runner around ONNX Runtime),
the verification batches, and the samples plans are verified on; no TensorRT or GPU needed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import TINY
from trt_fakes import FakeEngine
from wff.contracts import contracts_for
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import load_fusion_settings
from wff.ensemble.pipeline import Pipeline
from wff.ensemble.runtime import make_runner
from wff.serving import trt_preflight, trt_runtime, trt_verify
from wff.serving.repository import build_repository


# --------------------------------------------------------------------------- tolerance logic


def _detections(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "detector_boxes": rng.uniform(0, 512, (n, 3, 4)).astype(np.float32),
        "detector_scores": rng.uniform(0, 1, (n, 3)).astype(np.float32),
        "detector_labels": rng.integers(0, 3, (n, 3)).astype(np.int32),
        "detector_count": rng.integers(0, 4, (n, 1)).astype(np.int32),
    }


DISCRETE = ("detector_labels", "detector_count")


class TestCompareOutputs:
    def test_identical_passes(self):
        """Equal outputs: every difference is 0."""
        ref = _detections()
        c = trt_verify.compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, DISCRETE, trt_verify.TOLERANCES["fp32"])
        assert c.passed and c.misaligned == 0 and c.max_abs_diff == {"detector_boxes": 0.0, "detector_scores": 0.0}

    def test_fp16_tolerates_what_fp32_does_not(self):
        """1.5 px on boxes and 0.01 on scores: within FP16's tolerance, beyond FP32's."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_boxes"] += 1.5
        got["detector_scores"] += 0.01
        assert trt_verify.compare_outputs(ref, got, DISCRETE, trt_verify.TOLERANCES["fp16"]).passed
        c32 = trt_verify.compare_outputs(ref, got, DISCRETE, trt_verify.TOLERANCES["fp32"])
        assert not c32.passed
        assert any("detector_boxes: max abs difference 1.5 > atol 0.05" in f for f in c32.failures)
        assert c32.max_abs_diff["detector_boxes"] == pytest.approx(1.5, abs=1e-4)

    def test_fp16_fails_past_its_tolerance(self):
        """3 px on a box fails FP16 too, naming the output."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_boxes"][2, 1, 0] += 3.0
        c = trt_verify.compare_outputs(ref, got, DISCRETE, trt_verify.TOLERANCES["fp16"])
        assert not c.passed and c.failures[0].startswith("detector_boxes")

    def test_misaligned_sample_is_left_out(self):
        """FP16: 1 of 8 samples with a different count passes; its boxes are not compared."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_count"][3] += 1
        got["detector_boxes"][3] += 100.0  # rows shifted by the extra detection
        c = trt_verify.compare_outputs(ref, got, DISCRETE, trt_verify.TOLERANCES["fp16"])
        assert c.passed and c.misaligned == 1 and c.max_abs_diff["detector_boxes"] == 0.0
        assert not trt_verify.compare_outputs(ref, got, DISCRETE, trt_verify.TOLERANCES["fp32"]).passed

    def test_too_many_misaligned(self):
        """FP16: 2 of 8 samples with different labels fail."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_labels"][[0, 5], 0] = 3
        c = trt_verify.compare_outputs(ref, got, DISCRETE, trt_verify.TOLERANCES["fp16"])
        assert not c.passed and "2 of 8 samples differ" in c.failures[0]

    def test_all_misaligned_reports_no_difference(self):
        """With no aligned sample, continuous outputs have no difference to report (None)."""
        ref = _detections(n=1)
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_count"][0] += 1
        c = trt_verify.compare_outputs(ref, got, DISCRETE, trt_verify.TOLERANCES["fp16"])
        assert c.max_abs_diff["detector_boxes"] is None and not c.passed

    def test_nan(self):
        """NaN in both places is equal; NaN against a number fails."""
        ref = {"p": np.array([[np.nan, 0.5]], np.float32)}
        assert trt_verify.compare_outputs(ref, {"p": ref["p"].copy()}, (), trt_verify.TOLERANCES["fp32"]).passed
        c = trt_verify.compare_outputs(ref, {"p": np.array([[0.1, 0.5]], np.float32)}, (), trt_verify.TOLERANCES["fp32"])
        assert not c.passed and c.max_abs_diff["p"] == float("inf")

    def test_shape_and_missing_outputs(self):
        """A plan output with another shape, or no such output, fails."""
        ref = {"p": np.zeros((2, 2), np.float32)}
        fp16 = trt_verify.TOLERANCES["fp16"]
        assert "shape (2, 3)" in trt_verify.compare_outputs(ref, {"p": np.zeros((2, 3), np.float32)}, (), fp16).failures[0]
        assert "no outputs ['p']" in trt_verify.compare_outputs(ref, {}, (), fp16).failures[0]

    def test_overrides(self):
        """--atol overrides one output and keeps the rest."""
        fp32 = trt_verify.TOLERANCES["fp32"]
        tol = fp32.with_overrides({"detector_boxes": 2.0})
        assert tol.for_output("detector_boxes") == 2.0 and tol.for_output("detector_scores") == fp32.default_atol


@pytest.fixture(scope="module")
def synthetic_samples(trt_repo):
    """Verification inputs of the tiny repository from its default source, a synthetic patient."""
    return trt_verify.patient_samples(trt_repo, batch=5)


class TestVerifyPlan:
    def test_batches_and_verdicts(self, trt_repo, synthetic_samples):
        """10 samples, max batch 8: batches of 8, 2, then sample 0 alone; 0.005 passes FP16, fails FP32."""
        spec = trt_preflight.plan_spec(trt_repo, "classifier")
        reference = trt_runtime.OnnxRuntimeRunner(spec.onnx)
        samples = {"classifier_clip": np.concatenate([synthetic_samples["classifier_clip"]] * 2)}
        engine = FakeEngine(reference, shift=0.005)
        v16 = trt_verify.verify_plan(spec, engine, reference, samples, "fp16")
        assert engine.batches == [8, 2, 1]
        assert v16.passed and v16.max_abs_diff["classifier_probs"] == pytest.approx(0.005, abs=1e-6)
        v32 = trt_verify.verify_plan(spec, FakeEngine(reference, shift=0.005), reference, samples, "fp32")
        assert not v32.passed
        report = v32.to_dict()
        assert report["passed"] is False and json.dumps(report)  # JSON-serialisable for model.plan.json

    def test_detector_discrete_outputs_exact(self, trt_repo, synthetic_samples):
        """An exact fake engine passes both precisions on the stand-in detector."""
        spec = trt_preflight.plan_spec(trt_repo, "detector")
        reference = trt_runtime.OnnxRuntimeRunner(spec.onnx)
        samples = trt_verify.load_samples(spec, synthetic_samples, batch=3)
        assert trt_verify.verify_plan(spec, FakeEngine(reference), reference, samples, "fp32").passed

    def test_unknown_precision(self, trt_repo):
        """Only fp16 and fp32 have tolerances."""
        spec = trt_preflight.plan_spec(trt_repo, "classifier")
        with pytest.raises(ValueError, match="unknown precision 'int8'"):
            trt_verify.verify_plan(spec, None, None, {}, "int8")


def neighbour_correlation(images: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels over a stack (..., H, W): ~0 for noise, high for anatomy."""
    flat = images.reshape(-1, *images.shape[-2:])
    return float(np.corrcoef(flat[:, :, :-1].ravel(), flat[:, :, 1:].ravel())[0, 1])


def served_inputs(artifacts, patient):
    """What the in-process ensemble hands the detector and the classifier for ``patient``'s files."""
    c = contracts_for(TINY)
    seen = {"detector": [], "classifier": []}

    def recorded(step):
        runner = make_runner("onnxruntime", artifacts / f"{step}.onnx", c.step(step), 1)
        return lambda batch: seen[step].append(batch) or runner(batch)

    pipeline = Pipeline(TINY, recorded("detector"), recorded("classifier"), load_fusion_settings(artifacts / "fusion.json"),
                        AgePrior.load(artifacts / "age_prior.json"))
    pipeline.diagnose_files([(f.relative_to(patient).as_posix(), f.read_bytes()) for f in sorted(patient.rglob("*.dcm"))])
    return {step: np.concatenate(batches) for step, batches in seen.items()}


class TestSamples:
    def test_synthetic_patient_shapes_and_range(self, trt_repo, synthetic_samples):
        """Default: B letterboxed slices (B, 1, S, S) and B clips (B, 1, N, C, C), FP32 in [0, 1], reproducible."""
        slices, clips = synthetic_samples["detector_image"], synthetic_samples["classifier_clip"]
        assert slices.shape == (5, 1, 64, 64) and clips.shape == (5, 1, 4, 16, 16)
        for array in (slices, clips):
            assert array.dtype == np.float32 and 0 <= array.min() and array.max() <= 1
        again = trt_verify.patient_samples(trt_repo, batch=5)
        assert all(np.array_equal(again[k], synthetic_samples[k]) for k in synthetic_samples)

    def test_real_images_not_noise(self, synthetic_samples):
        """Adjacent pixels of the slices and clips correlate as in anatomy (uniform noise: ~0); no two samples are equal."""
        assert abs(neighbour_correlation(np.random.default_rng(0).random((5, 64, 64)))) < 0.05
        for name, array in synthetic_samples.items():
            assert neighbour_correlation(array) > 0.6, name
            assert len({a.tobytes() for a in array}) == len(array), name
        assert synthetic_samples["detector_image"].std() > 0.1  # windowed intensities, not a flat image

    def test_patient_folder_gives_the_served_inputs(self, trt_repo, tiny_artifacts, dicom_patient):
        """From a patient folder: the slices are the detector's served inputs, the first clips the served clips."""
        served = served_inputs(tiny_artifacts, dicom_patient)
        n_series = len(served["classifier"])
        samples = trt_verify.patient_samples(trt_repo, dicom_patient, batch=n_series + 2)
        np.testing.assert_array_equal(samples["classifier_clip"][:n_series], served["classifier"])
        extra = samples["classifier_clip"][n_series:]
        assert not any(np.array_equal(e, s) for e in extra for s in served["classifier"])
        slices = {s.tobytes() for s in served["detector"]}
        assert all(s.tobytes() in slices for s in samples["detector_image"])
        assert samples["detector_image"][0].tobytes() == served["detector"][0].tobytes()
        assert samples["detector_image"][-1].tobytes() == served["detector"][-1].tobytes()

    def test_synthetic_patient_under_small_request_limits(self, limited_artifacts, tmp_path):
        """A profile whose request limits are below the synthetic patient's size still gets its default samples."""
        repo = build_repository(tmp_path / "repo", "tensorrt", limited_artifacts)
        samples = trt_verify.patient_samples(repo, batch=2)
        assert samples["detector_image"].shape == (2, 1, 64, 64) and samples["classifier_clip"].shape == (2, 1, 4, 16, 16)

    def test_bad_patient_folder_and_repository(self, trt_repo, tmp_path):
        """An empty folder and a repository without profile.json are refused with what to do."""
        with pytest.raises(trt_preflight.PlanError, match="verification samples: .*no files"):
            trt_verify.patient_samples(trt_repo, tmp_path)
        bare = tmp_path / "bare"
        shutil.copytree(trt_repo, bare, ignore=shutil.ignore_patterns("profile.json"))
        with pytest.raises(trt_preflight.PlanError, match="no profile.json.*--samples"):
            trt_verify.patient_samples(bare)

    def test_npz_samples(self, trt_repo, tmp_path):
        """An npz gives the inputs; a missing name or wrong dims is refused."""
        spec = trt_preflight.plan_spec(trt_repo, "classifier")
        good = tmp_path / "good.npz"
        np.savez(good, classifier_clip=np.ones((5, 1, 4, 16, 16), np.float64))
        arrays, origin = trt_verify.verification_inputs(trt_repo, good)
        assert origin == str(good)
        assert trt_verify.load_samples(spec, arrays, batch=3, origin=origin)["classifier_clip"].shape == (3, 1, 4, 16, 16)
        np.savez(tmp_path / "bad.npz", clip=np.ones((1, 1, 4, 16, 16)))
        arrays, origin = trt_verify.verification_inputs(trt_repo, tmp_path / "bad.npz")
        with pytest.raises(trt_preflight.PlanError, match="bad.npz: no array 'classifier_clip'"):
            trt_verify.load_samples(spec, arrays, origin=origin)
        np.savez(tmp_path / "dims.npz", classifier_clip=np.ones((1, 1, 4, 8, 8)))
        with pytest.raises(trt_preflight.PlanError, match=r"expected \(B, 1, 4, 16, 16\)"):
            trt_verify.load_samples(spec, trt_verify.verification_inputs(trt_repo, tmp_path / "dims.npz")[0])

