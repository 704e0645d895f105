"""wff.serving.trt and `wff trt`: what can be checked without TensorRT or a GPU.

The plan build itself needs the NGC container and a GPU (docker/README.md); here: argument
validation of the command line, and the build orchestration (profile, flags, timing cache,
plan and report files, skipping up-to-date plans, the plan cache, failing) with a fake
TensorRT. Preflight, runtime and verification have their own test_trt_*.py files.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from trt_fakes import FakeEngine
from wff.cli import main as wff_main
from wff.serving import trt, trt_cache, trt_preflight, trt_runtime, trt_verify
from wff.serving.repository import build_repository
from wff.serving.trt_cli import parse_atol
from wff.serving.trt_cli import trt as trt_group


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
        spec = trt_preflight.plan_spec(trt_repo, "classifier")
        fp16 = trt.trtexec_command(spec, "fp16", 2048, tmp_path / "c.cache")
        fp32 = trt.trtexec_command(spec, "fp32", 2048, None)
        assert "--maxShapes=classifier_clip:8x1x4x16x16" in fp16 and "--memPoolSize=workspace:2048M" in fp16
        assert "--fp16" in fp16 and f"--timingCacheFile={tmp_path / 'c.cache'}" in fp16
        assert "--noTF32" in fp32 and "--fp16" not in fp32


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
        fake.engines.append(FakeEngine(trt_runtime.OnnxRuntimeRunner(repo / step / "1" / "model.onnx"), shift["value"]))
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
        assert report["onnx_sha256"] == trt_cache.sha256(repo / "detector" / "1" / "model.onnx")

    def test_verifies_on_a_synthetic_patient_by_default(self, fake_trt):
        """Without --samples the plans see the synthetic patient's slices and clips, and the reports say so."""
        repo, fake, _ = fake_trt
        reports = trt.build_plans(repo, verify_batch=5)
        synthetic_samples = trt_verify.patient_samples(repo, batch=5)
        fed = {name: array for engine in fake.engines for name, array in engine.feeds[0].items()}
        assert fed.keys() == synthetic_samples.keys()
        for name, array in synthetic_samples.items():
            np.testing.assert_array_equal(fed[name], array)
        assert {r["verification"]["samples"] for r in reports} == {"synthetic patient (wff.training.synth, seed 0)"}

    def test_verifies_on_a_patient_folder(self, fake_trt, dicom_patient):
        """--samples PATIENT_DIR: that patient's prepared slices are verified on."""
        repo, fake, _ = fake_trt
        reports = trt.build_plans(repo, models=["detector"], samples=dicom_patient, verify_batch=3)
        expected = trt_verify.patient_samples(repo, dicom_patient, batch=3)["detector_image"]
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
        with pytest.raises(trt_preflight.PlanError):
            trt.build_plans(repo, models=["classifier"], verify_batch=2, plan_cache=tmp_path / "plans")
        assert not (tmp_path / "plans" / "classifier").exists() or not any((tmp_path / "plans" / "classifier").iterdir())

    def test_plan_cache_from_the_environment(self, fake_trt, tmp_path):
        """`wff trt build` reads the plan cache folder from WFF_TRT_PLAN_CACHE (how the container is configured)."""
        repo, _, _ = fake_trt
        cache = tmp_path / "plans"
        result = CliRunner().invoke(trt_group, ["build", str(repo), "--model", "detector", "--verify-batch", "2"],
                                    env={trt_cache.PLAN_CACHE_ENV: str(cache)})
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
        with pytest.raises(trt_preflight.PlanError, match="classifier_probs: max abs difference 0.1"):
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
        with pytest.raises(trt_preflight.PlanError, match="would not load"):
            trt.build_plans(repo)
        assert fake.builds == 0

    def test_cli_reports_verdicts(self, fake_trt):
        """`wff trt build` prints one verdict line per plan and can write the reports as JSON."""
        repo, _, _ = fake_trt
        result = CliRunner().invoke(trt_group, ["build", str(repo), "--verify-batch", "2", "--json", str(repo / "r.json")])
        assert result.exit_code == 0, result.output
        assert "detector: " in result.output and "verified; max abs diff detector_boxes 0" in result.output
        assert [r["model"] for r in json.loads((repo / "r.json").read_text())] == ["detector", "classifier"]
