"""wff.serving.trt and `wff trt`: what can be checked without TensorRT or a GPU.

The plan build itself needs the NGC container and a GPU (docker/README.md); here: argument
validation, profile shapes from the repository configs, the error without TensorRT, the
tolerance logic (with a fake engine runner around ONNX Runtime), and TensorRT 10 op support
of every graph our exporter writes.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import TINY
from wff.cli import main as wff_main
from wff.config import PAPER
from wff.contracts import contracts_for
from wff.ensemble.age_prior import AgePrior
from wff.ensemble.fusion import FusionSettings, load_fusion_settings
from wff.ensemble.pipeline import Pipeline
from wff.ensemble.runtime import make_runner
from wff.serving import trt
from wff.serving.repository import build_repository, config_text, read_config, repository_configs
from wff.serving.trt_cli import parse_atol
from wff.serving.trt_cli import trt as trt_group

# The constraints tensorrt_onnx_ops.json must document (the issue asks for each of them).
REQUIRED_NOTES = {"dynamic_shapes", "TopK", "RoiAlign", "NonMaxSuppression", "NonZero", "DeformConv", "int64", "Resize", "GridSample"}


@pytest.fixture(scope="module")
def trt_repo(tiny_artifacts, tmp_path_factory):
    """A --target tensorrt repository of the tiny profile with the stand-in ONNX models."""
    return build_repository(tmp_path_factory.mktemp("trt") / "repo", "tensorrt", tiny_artifacts)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make both TensorRT module names unimportable, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)


def _configs(profile):
    return repository_configs(profile, "tensorrt", FusionSettings(profile.fusion.strategy, profile.fusion.det_threshold))


class TestProfileShapes:
    def test_tiny_detector_from_config(self, tiny_profile):
        """Batch 1 / largest preferred (64) / max_batch_size (96); other dims from the contract."""
        (shape,) = trt.profile_shapes(_configs(tiny_profile)["detector"])
        assert shape == trt.InputProfile("detector_image", (1, 1, 64, 64), (64, 1, 64, 64), (96, 1, 64, 64))

    def test_paper_classifier_and_detector(self):
        """The paper profile: 512-px slices, 16 x 112 x 112 clips."""
        configs = _configs(PAPER)
        (det,) = trt.profile_shapes(configs["detector"])
        (cls,) = trt.profile_shapes(configs["classifier"])
        assert (det.min, det.opt, det.max) == ((1, 1, 512, 512), (64, 1, 512, 512), (96, 1, 512, 512))
        assert (cls.min, cls.opt, cls.max) == ((1, 1, 16, 112, 112), (8, 1, 16, 112, 112), (8, 1, 16, 112, 112))

    @pytest.mark.parametrize(
        "max_batch, preferred, expected",
        [(96, (32, 64), 64), (96, (128,), 96), (8, (), 8), (6, (4, 8), 4), (1, (1,), 1)],
    )
    def test_opt_batch_is_largest_usable_preferred(self, max_batch, preferred, expected):
        """Preferred sizes above max_batch_size are ignored; none left means opt = max."""
        assert trt.choose_opt_batch(max_batch, preferred) == expected

    def test_explicit_opt_out_of_range(self, tiny_profile):
        """An opt batch beyond max_batch_size is refused with the allowed range."""
        with pytest.raises(trt.PlanError, match=r"outside 1\.\.96"):
            trt.profile_shapes(_configs(tiny_profile)["detector"], opt_batch=97)

    def test_non_batching_model_refused(self, tiny_profile):
        """max_batch_size 0 (a Python step) cannot get a plan."""
        with pytest.raises(trt.PlanError, match="max_batch_size is 0"):
            trt.profile_shapes(_configs(tiny_profile)["crop"])

    def test_variable_non_batch_dim_refused(self, tiny_profile):
        """Only the batch dim may vary."""
        cfg = _configs(tiny_profile)["detector"]
        cfg.input[0].dims[1] = -1
        with pytest.raises(trt.PlanError, match="only the batch dim"):
            trt.profile_shapes(cfg)

    def test_plan_spec_reads_the_repository(self, trt_repo):
        """plan_spec: config.pbtxt + model.onnx + contracts; INT32 outputs are the discrete ones."""
        spec = trt.plan_spec(trt_repo, "detector")
        assert spec.plan == trt_repo / "detector" / "1" / "model.plan"
        assert spec.onnx.is_file() and spec.max_batch_size == 96 and spec.opt_batch == 64
        assert spec.discrete_outputs == ("detector_labels", "detector_count")
        assert trt.plan_spec(trt_repo, "classifier").inputs[0].max == (8, 1, 4, 16, 16)

    def test_config_edited_away_from_contracts(self, trt_repo, tmp_path):
        """A config.pbtxt whose dims disagree with profile.json's contracts is refused."""
        repo = tmp_path / "repo"
        shutil.copytree(trt_repo, repo)
        path = repo / "classifier" / "config.pbtxt"
        cfg = read_config(path)
        cfg.input[0].dims[2] = 32
        path.write_text(config_text(cfg))
        with pytest.raises(trt.PlanError, match="does not match wff.contracts"):
            trt.plan_spec(repo, "classifier")

    def test_embedded_repository_refused(self, tiny_artifacts, tmp_path):
        """A repository built for another target says how to build the right one."""
        repo = build_repository(tmp_path / "repo", "embedded", tiny_artifacts)
        with pytest.raises(trt.PlanError, match="--target tensorrt"):
            trt.plan_spec(repo, "detector")


class TestTensorRTMissing:
    def test_import_error_message(self, no_tensorrt):
        """Without TensorRT: the message says where to run it."""
        with pytest.raises(trt.TensorRTUnavailable) as e:
            trt.import_tensorrt()
        assert str(e.value) == "TensorRT is not installed: run this inside the NGC tritonserver container, see docker/README.md"

    def test_build_command_fails_cleanly(self, trt_repo, no_tensorrt):
        """`wff trt build` preflights, then exits 1 with that message (no traceback)."""
        result = CliRunner().invoke(trt_group, ["build", str(trt_repo)])
        assert result.exit_code == 1
        assert "TensorRT is not installed" in result.output and "docker/README.md" in result.output
        assert not (trt_repo / "detector" / "1" / "model.plan").exists()


class TestCli:
    def test_registered_in_wff(self):
        """`wff trt` is a command of the main group (lazy import)."""
        result = CliRunner().invoke(wff_main, ["trt", "--help"])
        assert result.exit_code == 0 and "build" in result.output and "check" in result.output

    @pytest.mark.parametrize(
        "args, message",
        [
            (["--precision", "fp8"], "fp8"),
            (["--workspace-mib", "0"], "workspace-mib"),
            (["--verify-batch", "0"], "verify-batch"),
            (["--model", "crop"], "crop"),
            (["--atol", "detector_boxes"], "OUTPUT=NON_NEGATIVE_NUMBER"),
            (["--atol", "detector_boxes=-1"], "OUTPUT=NON_NEGATIVE_NUMBER"),
        ],
    )
    def test_bad_options_are_usage_errors(self, trt_repo, args, message):
        """Bad option values exit 2 and name the option or value."""
        result = CliRunner().invoke(trt_group, ["build", str(trt_repo), *args])
        assert result.exit_code == 2 and message in result.output

    def test_missing_repository(self, tmp_path):
        """A repository path that does not exist is a usage error."""
        result = CliRunner().invoke(trt_group, ["build", str(tmp_path / "nope")])
        assert result.exit_code == 2

    def test_unknown_atol_output(self, trt_repo, no_tensorrt):
        """--atol must name an output of the models being built (checked before TensorRT is needed)."""
        result = CliRunner().invoke(trt_group, ["build", str(trt_repo), "--atol", "detector_bozes=1"])
        assert result.exit_code == 1 and "unknown outputs ['detector_bozes']" in result.output

    def test_parse_atol(self):
        """OUTPUT=VALUE pairs become a dict."""
        assert parse_atol(("detector_boxes=1.5", "classifier_probs=0")) == {"detector_boxes": 1.5, "classifier_probs": 0.0}

    def test_check_prints_profiles_and_passes(self, trt_repo):
        """`wff trt check` works without TensorRT: shapes, trtexec equivalent, op support."""
        result = CliRunner().invoke(trt_group, ["check", str(trt_repo)])
        assert result.exit_code == 0, result.output
        assert "detector_image: min [1, 1, 64, 64]  opt [64, 1, 64, 64]  max [96, 1, 64, 64]" in result.output
        assert "classifier_clip: min [1, 1, 4, 16, 16]  opt [8, 1, 4, 16, 16]  max [8, 1, 4, 16, 16]" in result.output
        assert "--optShapes=detector_image:64x1x64x64" in result.output

    def test_check_refuses_embedded_repository(self, tiny_artifacts, tmp_path):
        """check names the target to use."""
        repo = build_repository(tmp_path / "repo", "embedded", tiny_artifacts)
        result = CliRunner().invoke(trt_group, ["check", str(repo)])
        assert result.exit_code == 1 and "tensorrt_plan" in result.output

    def test_trtexec_equivalent(self, trt_repo, tmp_path):
        """The recorded trtexec line has the profile, the precision flag and the cache."""
        spec = trt.plan_spec(trt_repo, "classifier")
        fp16 = trt.trtexec_command(spec, "fp16", 2048, tmp_path / "c.cache")
        fp32 = trt.trtexec_command(spec, "fp32", 2048, None)
        assert "--maxShapes=classifier_clip:8x1x4x16x16" in fp16 and "--memPoolSize=workspace:2048M" in fp16
        assert "--fp16" in fp16 and f"--timingCacheFile={tmp_path / 'c.cache'}" in fp16
        assert "--noTF32" in fp32 and "--fp16" not in fp32


class TestVersions:
    LDD = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibnvinfer.so.10 => /usr/lib/x86_64-linux-gnu/libnvinfer.so.10 (0x00007f1)\n"
        "\tlibnvinfer_plugin.so.10 => /usr/lib/x86_64-linux-gnu/libnvinfer_plugin.so.10 (0x00007f2)\n"
    )

    def test_parse_ldd(self):
        """ldd's libnvinfer line (not the plugin's) gives the library path."""
        assert trt.parse_ldd_libnvinfer(self.LDD) == "/usr/lib/x86_64-linux-gnu/libnvinfer.so.10"
        assert trt.parse_ldd_libnvinfer("\tlibc.so.6 => /lib/libc.so.6\n") is None

    def test_library_version_follows_the_soname_link(self, tmp_path):
        """libnvinfer.so.10 -> libnvinfer.so.10.5.0 gives 10.5.0."""
        (tmp_path / "libnvinfer.so.10.5.0").write_bytes(b"")
        (tmp_path / "libnvinfer.so.10").symlink_to("libnvinfer.so.10.5.0")
        assert trt.library_version(tmp_path / "libnvinfer.so.10") == "10.5.0"

    @pytest.mark.parametrize("a, b, same", [("10.5.0", "10.5.0", True), ("10.5.0.18", "10.5.0", True), ("10.6.0", "10.5.0", False)])
    def test_same_release(self, a, b, same):
        """Plans need the same major.minor.patch."""
        assert trt.same_release(a, b) is same


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
        c = trt.compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, DISCRETE, trt.TOLERANCES["fp32"])
        assert c.passed and c.misaligned == 0 and c.max_abs_diff == {"detector_boxes": 0.0, "detector_scores": 0.0}

    def test_fp16_tolerates_what_fp32_does_not(self):
        """1.5 px on boxes and 0.01 on scores: within FP16's tolerance, beyond FP32's."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_boxes"] += 1.5
        got["detector_scores"] += 0.01
        assert trt.compare_outputs(ref, got, DISCRETE, trt.TOLERANCES["fp16"]).passed
        c32 = trt.compare_outputs(ref, got, DISCRETE, trt.TOLERANCES["fp32"])
        assert not c32.passed
        assert any("detector_boxes: max abs difference 1.5 > atol 0.05" in f for f in c32.failures)
        assert c32.max_abs_diff["detector_boxes"] == pytest.approx(1.5, abs=1e-4)

    def test_fp16_fails_past_its_tolerance(self):
        """3 px on a box fails FP16 too, naming the output."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_boxes"][2, 1, 0] += 3.0
        c = trt.compare_outputs(ref, got, DISCRETE, trt.TOLERANCES["fp16"])
        assert not c.passed and c.failures[0].startswith("detector_boxes")

    def test_misaligned_sample_is_left_out(self):
        """FP16: 1 of 8 samples with a different count passes; its boxes are not compared."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_count"][3] += 1
        got["detector_boxes"][3] += 100.0  # rows shifted by the extra detection
        c = trt.compare_outputs(ref, got, DISCRETE, trt.TOLERANCES["fp16"])
        assert c.passed and c.misaligned == 1 and c.max_abs_diff["detector_boxes"] == 0.0
        assert not trt.compare_outputs(ref, got, DISCRETE, trt.TOLERANCES["fp32"]).passed

    def test_too_many_misaligned(self):
        """FP16: 2 of 8 samples with different labels fail."""
        ref = _detections()
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_labels"][[0, 5], 0] = 3
        c = trt.compare_outputs(ref, got, DISCRETE, trt.TOLERANCES["fp16"])
        assert not c.passed and "2 of 8 samples differ" in c.failures[0]

    def test_all_misaligned_reports_no_difference(self):
        """With no aligned sample, continuous outputs have no difference to report (None)."""
        ref = _detections(n=1)
        got = {k: v.copy() for k, v in ref.items()}
        got["detector_count"][0] += 1
        c = trt.compare_outputs(ref, got, DISCRETE, trt.TOLERANCES["fp16"])
        assert c.max_abs_diff["detector_boxes"] is None and not c.passed

    def test_nan(self):
        """NaN in both places is equal; NaN against a number fails."""
        ref = {"p": np.array([[np.nan, 0.5]], np.float32)}
        assert trt.compare_outputs(ref, {"p": ref["p"].copy()}, (), trt.TOLERANCES["fp32"]).passed
        c = trt.compare_outputs(ref, {"p": np.array([[0.1, 0.5]], np.float32)}, (), trt.TOLERANCES["fp32"])
        assert not c.passed and c.max_abs_diff["p"] == float("inf")

    def test_shape_and_missing_outputs(self):
        """A plan output with another shape, or no such output, fails."""
        ref = {"p": np.zeros((2, 2), np.float32)}
        assert "shape (2, 3)" in trt.compare_outputs(ref, {"p": np.zeros((2, 3), np.float32)}, (), trt.TOLERANCES["fp16"]).failures[0]
        assert "no outputs ['p']" in trt.compare_outputs(ref, {}, (), trt.TOLERANCES["fp16"]).failures[0]

    def test_overrides(self):
        """--atol overrides one output and keeps the rest."""
        tol = trt.TOLERANCES["fp32"].with_overrides({"detector_boxes": 2.0})
        assert tol.for_output("detector_boxes") == 2.0 and tol.for_output("detector_scores") == trt.TOLERANCES["fp32"].default_atol


class FakeEngine:
    """Stands in for a TensorRT plan: ONNX Runtime's outputs, perturbed; records its feeds and batch sizes."""

    def __init__(self, reference, shift=0.0):
        self.reference, self.shift, self.batches, self.feeds = reference, shift, [], []

    def run(self, feeds):
        self.feeds.append(dict(feeds))
        self.batches.append(len(next(iter(feeds.values()))))
        out = self.reference.run(feeds)
        return {k: v + np.asarray(self.shift, v.dtype) if v.dtype == np.float32 else v for k, v in out.items()}


@pytest.fixture(scope="module")
def synthetic_samples(trt_repo):
    """Verification inputs of the tiny repository from its default source, a synthetic patient."""
    return trt.patient_samples(trt_repo, batch=5)


class TestVerifyPlan:
    def test_batches_and_verdicts(self, trt_repo, synthetic_samples):
        """10 samples, max batch 8: batches of 8, 2, then sample 0 alone; 0.005 passes FP16, fails FP32."""
        spec = trt.plan_spec(trt_repo, "classifier")
        reference = trt.OnnxRuntimeRunner(spec.onnx)
        samples = {"classifier_clip": np.concatenate([synthetic_samples["classifier_clip"]] * 2)}
        engine = FakeEngine(reference, shift=0.005)
        v16 = trt.verify_plan(spec, engine, reference, samples, "fp16")
        assert engine.batches == [8, 2, 1]
        assert v16.passed and v16.max_abs_diff["classifier_probs"] == pytest.approx(0.005, abs=1e-6)
        v32 = trt.verify_plan(spec, FakeEngine(reference, shift=0.005), reference, samples, "fp32")
        assert not v32.passed
        report = v32.to_dict()
        assert report["passed"] is False and json.dumps(report)  # JSON-serialisable for model.plan.json

    def test_detector_discrete_outputs_exact(self, trt_repo, synthetic_samples):
        """An exact fake engine passes both precisions on the stand-in detector."""
        spec = trt.plan_spec(trt_repo, "detector")
        reference = trt.OnnxRuntimeRunner(spec.onnx)
        samples = trt.load_samples(spec, synthetic_samples, batch=3)
        assert trt.verify_plan(spec, FakeEngine(reference), reference, samples, "fp32").passed

    def test_unknown_precision(self, trt_repo):
        """Only fp16 and fp32 have tolerances."""
        spec = trt.plan_spec(trt_repo, "classifier")
        with pytest.raises(ValueError, match="unknown precision 'int8'"):
            trt.verify_plan(spec, None, None, {}, "int8")


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
        again = trt.patient_samples(trt_repo, batch=5)
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
        samples = trt.patient_samples(trt_repo, dicom_patient, batch=n_series + 2)
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
        samples = trt.patient_samples(repo, batch=2)
        assert samples["detector_image"].shape == (2, 1, 64, 64) and samples["classifier_clip"].shape == (2, 1, 4, 16, 16)

    def test_bad_patient_folder_and_repository(self, trt_repo, tmp_path):
        """An empty folder and a repository without profile.json are refused with what to do."""
        with pytest.raises(trt.PlanError, match="verification samples: .*no files"):
            trt.patient_samples(trt_repo, tmp_path)
        bare = tmp_path / "bare"
        shutil.copytree(trt_repo, bare, ignore=shutil.ignore_patterns("profile.json"))
        with pytest.raises(trt.PlanError, match="no profile.json.*--samples"):
            trt.patient_samples(bare)

    def test_npz_samples(self, trt_repo, tmp_path):
        """An npz gives the inputs; a missing name or wrong dims is refused."""
        spec = trt.plan_spec(trt_repo, "classifier")
        good = tmp_path / "good.npz"
        np.savez(good, classifier_clip=np.ones((5, 1, 4, 16, 16), np.float64))
        arrays, origin = trt.verification_inputs(trt_repo, good)
        assert origin == str(good)
        assert trt.load_samples(spec, arrays, batch=3, origin=origin)["classifier_clip"].shape == (3, 1, 4, 16, 16)
        np.savez(tmp_path / "bad.npz", clip=np.ones((1, 1, 4, 16, 16)))
        arrays, origin = trt.verification_inputs(trt_repo, tmp_path / "bad.npz")
        with pytest.raises(trt.PlanError, match="bad.npz: no array 'classifier_clip'"):
            trt.load_samples(spec, arrays, origin=origin)
        np.savez(tmp_path / "dims.npz", classifier_clip=np.ones((1, 1, 4, 8, 8)))
        with pytest.raises(trt.PlanError, match=r"expected \(B, 1, 4, 16, 16\)"):
            trt.load_samples(spec, trt.verification_inputs(trt_repo, tmp_path / "dims.npz")[0])


# --------------------------------------------------------------------------- op support


@pytest.fixture(scope="module")
def ops_table():
    return trt.load_ops_table()


@pytest.fixture(scope="module")
def exported_graphs(tiny_profile, tmp_path_factory):
    """Detector (DetectorGraph) and classifier of both profiles as wff.training.export writes them.

    The paper profile keeps its architecture (ResNeXt101-32x8d with deformable convolutions,
    five-level FPN, 3D ResNeXt-101) on small inputs so the export stays quick on CPU.
    """
    import torch

    from wff.training.export import export_classifier, export_detector
    from wff.training.models import build_classifier, build_detector

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("exported")
    paper = PAPER.replace(image={"size": 64}, classifier={"clip_len": 4, "crop_size": 16})
    graphs = {}
    for name, profile in (("small", tiny_profile), ("paper", paper)):
        graphs[f"{name}-detector"] = out / f"{name}-detector.onnx"
        graphs[f"{name}-classifier"] = out / f"{name}-classifier.onnx"
        export_detector(build_detector(profile).eval(), profile, graphs[f"{name}-detector"])
        export_classifier(build_classifier(profile).eval(), profile, graphs[f"{name}-classifier"])
    return graphs


class TestOpsTable:
    def test_source_and_contents(self, ops_table):
        """The table names its source release and lists the ops our graphs rely on."""
        src = ops_table["source"]
        assert src["repository"] == "onnx/onnx-tensorrt" and src["file"] == "docs/operators.md" and "10.1-GA" in src["release"]
        assert ops_table["tensorrt_version"].startswith("10.")
        assert {"Conv", "TopK", "RoiAlign", "DeformConv", "Resize", "Softmax", "Gemm"} <= set(ops_table["supported"])
        assert not set(ops_table["supported"]) & set(ops_table["unsupported"])
        assert REQUIRED_NOTES <= set(ops_table["constraints"])

    @pytest.mark.parametrize("model", ["small-detector", "small-classifier", "paper-detector", "paper-classifier"])
    def test_exported_graph_is_supported(self, exported_graphs, ops_table, model):
        """Every op of the exported graph is in TensorRT 10's list, with no constraint violated."""
        from wff.training.export import onnx_op_types

        ops = onnx_op_types(exported_graphs[model])
        assert ops <= set(ops_table["supported"]), sorted(ops - set(ops_table["supported"]))
        assert trt.onnx_tensorrt_issues(exported_graphs[model], ops_table) == []

    @pytest.mark.parametrize("profile", ["small", "paper"])
    def test_exported_detector_roialign_and_topk(self, exported_graphs, profile):
        """The constraints that matter hold in the real detector: constant K, explicit sampling_ratio."""
        model = onnx.load(str(exported_graphs[f"{profile}-detector"]))
        consts = trt._constants(model.graph)
        topk = [n for n in model.graph.node if n.op_type == "TopK"]
        roi = [n for n in model.graph.node if n.op_type == "RoiAlign"]
        assert topk and all(n.input[1] in consts for n in topk)
        assert roi and all(trt._attrs(n).get("sampling_ratio", 0) > 0 and trt._attrs(n).get("mode", "avg") == "avg" for n in roi)

    def test_paper_detector_keeps_deformable_convolutions(self, exported_graphs):
        """The paper detector exports its deformable convolutions as ONNX DeformConv, which TensorRT 10 parses."""
        from wff.training.export import onnx_op_types

        assert "DeformConv" in onnx_op_types(exported_graphs["paper-detector"])

    def test_stand_in_graphs_pass(self, trt_repo, ops_table):
        """The repository's stand-in graphs (tests/conftest.py) pass the same check."""
        for model in ("detector", "classifier"):
            assert trt.onnx_tensorrt_issues(trt_repo / model / "1" / "model.onnx", ops_table) == []


def _graph(nodes, inputs, outputs, initializers=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _io(name, dims=("batch", 4), elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(dims))


class TestConstraintChecks:
    def test_topk_with_computed_k(self, ops_table):
        """TopK whose K comes from the data is flagged."""
        nodes = [
            helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["k"], to=TensorProto.INT64),
            helper.make_node("TopK", ["x", "k"], ["v", "i"]),
        ]
        issues = trt.onnx_tensorrt_issues(_graph(nodes, [_io("x")], [_io("v")]), ops_table)
        assert any("TopK" in i and "not a build-time constant" in i for i in issues)

    def test_topk_k_too_large(self, ops_table):
        """A constant K of 5000 is past the parser's 3840."""
        k = onnx.numpy_helper.from_array(np.array([5000], np.int64), "k")
        nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"])]
        issues = trt.onnx_tensorrt_issues(_graph(nodes, [_io("x", ("batch", 6000))], [_io("v", ("batch", 5000))], [k]), ops_table)
        assert any("K = 5000 is not below 3840" in i for i in issues)

    def test_roialign_without_sampling_ratio(self, ops_table):
        """RoiAlign relying on ONNX's default sampling_ratio 0 is flagged (TensorRT defaults to 1)."""
        nodes = [helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], output_height=7, output_width=7)]
        rois = onnx.numpy_helper.from_array(np.zeros((2, 4), np.float32), "rois")
        idx = onnx.numpy_helper.from_array(np.zeros(2, np.int64), "idx")
        model = _graph(nodes, [_io("x", ("batch", 8, 16, 16))], [_io("y", ("batch", 8, 7, 7))], [rois, idx])
        assert any("sampling_ratio must be set explicitly" in i for i in trt.onnx_tensorrt_issues(model, ops_table))

    def test_data_dependent_unsupported_and_custom_ops(self, ops_table):
        """NonZero (data-dependent), Unique (unsupported) and a custom-domain op are each flagged."""
        nodes = [
            helper.make_node("NonZero", ["x"], ["nz"]),
            helper.make_node("Unique", ["x"], ["u"]),
            helper.make_node("MyOp", ["x"], ["y"], domain="com.example"),
        ]
        model = _graph(nodes, [_io("x")], [_io("y")])
        model.opset_import.append(helper.make_opsetid("com.example", 1))
        issues = trt.onnx_tensorrt_issues(model, ops_table)
        assert any(i.startswith("NonZero") and "data-dependent" in i for i in issues)
        assert any(i.startswith("Unique") and "not supported" in i for i in issues)
        assert any(i.startswith("MyOp") and "plugin" in i for i in issues)

    def test_resize_cubic_and_io_types(self, ops_table):
        """Resize cubic, a DOUBLE output and a second dynamic dim are flagged."""
        scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
        nodes = [
            helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="cubic"),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.DOUBLE),
        ]
        model = _graph(nodes, [_io("x", ("batch", 1, "h", 8))], [_io("y", ("batch", 1, 16, 16), TensorProto.DOUBLE)], [scales])
        issues = trt.onnx_tensorrt_issues(model, ops_table)
        assert any("Resize" in i and "cubic" in i for i in issues)
        assert any("element type DOUBLE" in i for i in issues)
        assert any("dynamic dims [0, 2]" in i for i in issues)

    def test_opset_out_of_range(self, ops_table):
        """An opset newer than the parser's range is flagged."""
        model = _graph([helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")], opset=22)
        assert any("opset 22" in i for i in trt.onnx_tensorrt_issues(model, ops_table))


# --------------------------------------------------------------------------- build orchestration with a fake TensorRT


class FakeTensorRT:
    """The slice of the TensorRT 10 Python API that build_engine uses, recording the calls.

    It checks our orchestration (profile, flags, cache, plan and report files, skipping,
    failing), not TensorRT itself: that needs the NGC container and a GPU.
    """

    __version__ = "10.5.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16, TF32 = "fp16", "tf32"

    def __init__(self):
        self.calls: list[tuple] = []
        self.builds = 0
        self.engines: list[FakeEngine] = []  # the plan runners handed to the verification

    def init_libnvinfer_plugins(self, logger, namespace):
        self.calls.append(("plugins", namespace))

    def Builder(self, logger):  # noqa: N802 (TensorRT's name)
        fake = self

        class Network:
            def __init__(self):
                self.inputs, self.num_layers = [], 7

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return type("Tensor", (), {"name": self.inputs[i]})()

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.inputs = [i.name for i in onnx.load(path).graph.input]
                return True

        class Cache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            def __init__(self):
                self.flags = {"tf32"}  # TensorRT's default

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile", profile.shapes))

            def create_timing_cache(self, data):
                fake.calls.append(("cache_in", bytes(data)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.builds += 1
                fake.calls.append(("flags", frozenset(config.flags)))
                return b"PLAN " + network.inputs[0].encode()

        fake.OnnxParser = Parser
        return Builder()


class FakeCuda:
    name = "Fake GPU"

    def device(self):
        return {"index": 0, "name": self.name, "compute_capability": "9.0"}


@pytest.fixture
def fake_trt(monkeypatch, trt_repo, tmp_path):
    """A writable copy of the tiny tensorrt repository, with TensorRT, CUDA and the plan runner faked."""
    repo = tmp_path / "repo"
    shutil.copytree(trt_repo, repo)
    fake = FakeTensorRT()
    shift = {"value": 0.0}
    monkeypatch.setattr(trt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt, "CudaRuntime", FakeCuda)
    monkeypatch.setattr(trt, "triton_tensorrt_version", lambda: "10.5.0")

    def runner(trt_module, plan, logger, cuda):
        name = plan.decode().split()[1]
        step = "detector" if name == "detector_image" else "classifier"
        fake.engines.append(FakeEngine(trt.OnnxRuntimeRunner(repo / step / "1" / "model.onnx"), shift["value"]))
        return fake.engines[-1]

    monkeypatch.setattr(trt, "TensorRTRunner", runner)
    return repo, fake, shift


class TestBuildPlans:
    def test_builds_plans_and_reports(self, fake_trt):
        """Plans, reports and the timing cache are written; profile and FP16 flag as specified."""
        repo, fake, _ = fake_trt
        reports = trt.build_plans(repo, verify_batch=3)
        assert [r["model"] for r in reports] == ["detector", "classifier"] and fake.builds == 2
        assert ("profile", {"detector_image": ((1, 1, 64, 64), (64, 1, 64, 64), (96, 1, 64, 64))}) in fake.calls
        assert ("flags", frozenset({"fp16", "tf32"})) in fake.calls and ("plugins", "") in fake.calls
        assert (repo / trt.TIMING_CACHE_NAME).read_bytes() == b"timing-cache"
        report = json.loads((repo / "detector" / "1" / "model.plan.json").read_text())
        assert (repo / "detector" / "1" / "model.plan").read_bytes() == b"PLAN detector_image"
        assert report["tensorrt_version"] == "10.5.0" and report["gpu"]["name"] == "Fake GPU"
        assert report["builder"]["precision"] == "fp16" and report["profile"]["opt_batch"] == 64
        assert report["verification"]["passed"] and set(report["verification"]["max_abs_diff"]) == {
            "detector_boxes", "detector_scores", "detector_malignancy"}
        assert report["onnx_sha256"] == trt.sha256(repo / "detector" / "1" / "model.onnx")

    def test_verifies_on_a_synthetic_patient_by_default(self, fake_trt, synthetic_samples):
        """Without --samples the plans see the synthetic patient's slices and clips, and the reports say so."""
        repo, fake, _ = fake_trt
        reports = trt.build_plans(repo, verify_batch=5)
        fed = {name: array for engine in fake.engines for name, array in engine.feeds[0].items()}
        assert fed.keys() == synthetic_samples.keys()
        for name, array in synthetic_samples.items():
            np.testing.assert_array_equal(fed[name], array)
        assert {r["verification"]["samples"] for r in reports} == {"synthetic patient (wff.training.synth, seed 0)"}

    def test_verifies_on_a_patient_folder(self, fake_trt, dicom_patient):
        """--samples PATIENT_DIR: that patient's prepared slices are verified on."""
        repo, fake, _ = fake_trt
        reports = trt.build_plans(repo, models=["detector"], samples=dicom_patient, verify_batch=3)
        expected = trt.patient_samples(repo, dicom_patient, batch=3)["detector_image"]
        np.testing.assert_array_equal(fake.engines[0].feeds[0]["detector_image"], expected)
        assert reports[0]["verification"]["samples"] == f"patient folder {dicom_patient}"

    def test_plan_cache_spares_a_new_server_the_build(self, fake_trt, tmp_path, monkeypatch):
        """A verified plan is kept in the plan cache; a new repository (a new pod) copies it on the same GPU model
        and builds its own on another one; the timing cache is written through a unique temporary file."""
        repo, fake, _ = fake_trt
        fresh = [tmp_path / f"pod{i}" for i in range(2)]
        for pod in fresh:
            shutil.copytree(repo, pod)
        cache = tmp_path / "plans"
        trt.build_plans(repo, models=["classifier"], verify_batch=2, plan_cache=cache)
        (entry,) = (cache / "classifier").iterdir()
        assert entry.name.endswith("-trt10.5.0-fp16-fake-gpu-cc9.0") and sorted(p.name for p in entry.iterdir()) == [
            "model.plan", "model.plan.json"]
        reports = trt.build_plans(fresh[0], models=["classifier"], verify_batch=2, plan_cache=cache)
        assert fake.builds == 1 and reports[0]["verification"]["passed"]
        assert (fresh[0] / "classifier" / "1" / "model.plan").read_bytes() == (repo / "classifier" / "1" / "model.plan").read_bytes()
        trt.build_plans(fresh[0], models=["classifier"], verify_batch=2)  # now up to date on its own
        assert fake.builds == 1
        monkeypatch.setattr(FakeCuda, "name", "Other GPU")
        trt.build_plans(fresh[1], models=["classifier"], verify_batch=2, plan_cache=cache)
        assert fake.builds == 2 and len(list((cache / "classifier").iterdir())) == 2
        assert sorted(p.name for p in repo.iterdir() if "timing" in p.name) == [trt.TIMING_CACHE_NAME]

    def test_failed_plan_is_not_cached(self, fake_trt, tmp_path):
        """A plan that fails its verification never reaches the plan cache."""
        repo, _, shift = fake_trt
        shift["value"] = 0.1
        with pytest.raises(trt.PlanError):
            trt.build_plans(repo, models=["classifier"], verify_batch=2, plan_cache=tmp_path / "plans")
        assert not (tmp_path / "plans" / "classifier").exists() or not any((tmp_path / "plans" / "classifier").iterdir())

    def test_plan_cache_from_the_environment(self, fake_trt, tmp_path):
        """`wff trt build` reads the plan cache folder from WFF_TRT_PLAN_CACHE (how the container is configured)."""
        repo, _, _ = fake_trt
        cache = tmp_path / "plans"
        result = CliRunner().invoke(trt_group, ["build", str(repo), "--model", "detector", "--verify-batch", "2"],
                                    env={trt.PLAN_CACHE_ENV: str(cache)})
        assert result.exit_code == 0, result.output
        assert len(list((cache / "detector").iterdir())) == 1

    def test_up_to_date_plans_are_skipped(self, fake_trt):
        """A second build skips both plans; --force rebuilds; fp32 (TF32 off) is a different plan."""
        repo, fake, _ = fake_trt
        trt.build_plans(repo, verify_batch=2)
        trt.build_plans(repo, verify_batch=2)
        assert fake.builds == 2
        trt.build_plans(repo, models=["classifier"], force=True, verify_batch=2)
        assert fake.builds == 3
        trt.build_plans(repo, precision="fp32", models=["classifier"], verify_batch=2)
        assert fake.builds == 4 and ("flags", frozenset()) in fake.calls
        assert ("cache_in", b"timing-cache") in fake.calls  # later builds start from the saved cache

    def test_other_gpu_model_rebuilds(self, fake_trt, monkeypatch):
        """Plans are tied to the GPU: the same state on another GPU model is rebuilt."""
        repo, fake, _ = fake_trt
        trt.build_plans(repo, models=["classifier"], verify_batch=2)
        monkeypatch.setattr(FakeCuda, "name", "Other GPU")
        trt.build_plans(repo, models=["classifier"], verify_batch=2)
        assert fake.builds == 2

    def test_failed_verification_keeps_report_and_raises(self, fake_trt):
        """Outputs off by 0.1: PlanError names the output; the report says passed false; no skip next time."""
        repo, fake, shift = fake_trt
        shift["value"] = 0.1
        with pytest.raises(trt.PlanError, match="classifier_probs: max abs difference 0.1"):
            trt.build_plans(repo, models=["classifier"], verify_batch=2)
        report = json.loads((repo / "classifier" / "1" / "model.plan.json").read_text())
        assert report["verification"]["passed"] is False
        shift["value"] = 0.0
        trt.build_plans(repo, models=["classifier"], verify_batch=2)
        assert fake.builds == 2

    def test_tensorrt_mismatch_with_triton(self, fake_trt, monkeypatch):
        """TensorRT 10.5.0 in Python but 10.6.0 in Triton's backend: refused before building."""
        repo, fake, _ = fake_trt
        monkeypatch.setattr(trt, "triton_tensorrt_version", lambda: "10.6.0")
        with pytest.raises(trt.PlanError, match="would not load"):
            trt.build_plans(repo)
        assert fake.builds == 0

    def test_cli_reports_verdicts(self, fake_trt):
        """`wff trt build` prints one verdict line per plan and can write the reports as JSON."""
        repo, _, _ = fake_trt
        result = CliRunner().invoke(trt_group, ["build", str(repo), "--verify-batch", "2", "--json", str(repo / "r.json")])
        assert result.exit_code == 0, result.output
        assert "detector: " in result.output and "verified; max abs diff detector_boxes 0" in result.output
        assert [r["model"] for r in json.loads((repo / "r.json").read_text())] == ["detector", "classifier"]
