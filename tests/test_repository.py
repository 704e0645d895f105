"""wff repo build: generated configs parse, agree with the contracts, and wire the ensemble consistently."""

import dataclasses
import json

import pytest
from click.testing import CliRunner
from conftest import TINY

from wff.cli import main
from wff.config import load_profile
from wff.contracts import ENSEMBLE_NAME, contracts_for
from wff.ensemble.fusion import FusionSettings, fusion_parameters, load_fusion_settings, settings_from_parameters
from wff.serving.repository import (
    ADAPTERS_DIR,
    MODEL_STEPS,
    PYTHON_STEPS,
    TARGETS,
    build_repository,
    read_config,
)
from tritonclient.grpc import model_config_pb2 as mc

C = contracts_for(TINY)
MAX_ADAPTER_LINES = 80


@pytest.fixture(scope="module", params=TARGETS)
def built(request, tiny_artifacts, tmp_path_factory):
    """(target, repository path, {model name: parsed config})."""
    out = build_repository(tmp_path_factory.mktemp(request.param) / "repo", request.param, tiny_artifacts)
    configs = {p.parent.name: read_config(p) for p in out.glob("*/config.pbtxt")}
    return request.param, out, configs


def full_dims(cfg: mc.ModelConfig, tensor) -> tuple[int, ...]:
    """Dims as the ensemble sees them: the batch dim (-1) first for batching models."""
    return ((-1,) if cfg.max_batch_size > 0 else ()) + tuple(tensor.dims)


def compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


class TestConfigs:
    def test_every_model_has_a_parsing_config(self, built):
        """Five steps plus the ensemble, each config.pbtxt parsed by model_config_pb2 via text_format."""
        _, _, configs = built
        assert set(configs) == {s.name for s in C.steps} | {ENSEMBLE_NAME}
        for name, cfg in configs.items():
            assert cfg.name == name

    def test_step_tensors_follow_the_contracts(self, built):
        """Names, dtypes, dims and max_batch_size of every step are the contract's."""
        _, _, configs = built
        for contract in C.steps + (C.ensemble,):
            cfg = configs[contract.name]
            assert cfg.max_batch_size == contract.max_batch_size
            for specs, tensors in ((contract.inputs, cfg.input), (contract.outputs, cfg.output)):
                got = [(t.name, mc.DataType.Name(t.data_type), tuple(t.dims)) for t in tensors]
                assert got == [(s.name, s.data_type, s.dims) for s in specs]

    def test_ensemble_wiring_is_type_and_shape_consistent(self, built):
        """Every ensemble tensor has one producer; consumers and ensemble outputs agree with it on dtype and dims."""
        _, _, configs = built
        ens = configs[ENSEMBLE_NAME]
        produced = {t.name: (t.data_type, tuple(t.dims)) for t in ens.input}
        for step in ens.ensemble_scheduling.step:
            model = configs[step.model_name]
            inputs = {t.name: t for t in model.input}
            assert set(step.input_map) == set(inputs), step.model_name
            for model_input, tensor in step.input_map.items():
                assert tensor in produced, f"{step.model_name} reads {tensor} before it is produced"
                dtype, dims = produced[tensor]
                assert dtype == inputs[model_input].data_type, (step.model_name, model_input)
                assert compatible(dims, full_dims(model, inputs[model_input])), (step.model_name, model_input, dims)
            outputs = {t.name: t for t in model.output}
            for model_output, tensor in step.output_map.items():
                assert tensor not in produced, f"{tensor} produced twice"
                produced[tensor] = (outputs[model_output].data_type, full_dims(model, outputs[model_output]))
        for t in ens.output:
            assert produced[t.name] == (t.data_type, tuple(t.dims)) or (
                produced[t.name][0] == t.data_type and compatible(produced[t.name][1], tuple(t.dims))
            ), t.name

    def test_batching_steps_have_dynamic_batching(self, built):
        """Detector and classifier batch dynamically with preferred sizes within max_batch_size."""
        _, _, configs = built
        for name in MODEL_STEPS:
            cfg = configs[name]
            assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == TINY.serving.max_queue_delay_us
            assert all(0 < b <= cfg.max_batch_size for b in cfg.dynamic_batching.preferred_batch_size)
        for name in PYTHON_STEPS:
            batcher = configs[name].dynamic_batching
            assert configs[name].backend == "python" and configs[name].max_batch_size == 0
            assert not batcher.preferred_batch_size and batcher.max_queue_delay_microseconds == 0  # one request at a time
            assert configs[name].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU

    def test_fusion_parameters_carry_the_settings(self, built, tiny_artifacts):
        """The fusion config's parameters give back fusion.json's six strategies and threshold."""
        _, _, configs = built
        params = {k: v.string_value for k, v in configs["fusion"].parameters.items()}
        assert settings_from_parameters(params).strategies == load_fusion_settings(tiny_artifacts / "fusion.json").strategies
        assert len(json.loads(params["strategies"])) == 6

    def test_fusion_parameters_carry_what_decides(self):
        """Vote thresholds reach the client too, so its Table 3 matches the server's decisions."""
        s = FusionSettings(det_threshold=0.2, vote_thresholds={"Det": 0.65})
        back = settings_from_parameters(fusion_parameters(s))
        assert back == dataclasses.replace(s, cv={})
        assert back.vote_threshold("Det") == 0.65 and back.vote_threshold("Seq") == 0.5

    def test_fusion_parameters_of_older_repositories(self):
        """A repository built before vote thresholds were parameters reads as 0.5."""
        params = {k: v for k, v in fusion_parameters(FusionSettings()).items() if k in ("served_strategy", "det_threshold", "strategies")}
        back = settings_from_parameters(params)
        assert set(back.vote_thresholds.values()) == {0.5}

    def test_fusion_parameters_malformed(self):
        """A hand-edited parameter that is not JSON is named as such, with the fix, not a bare decode error."""
        params = fusion_parameters(FusionSettings())
        assert params["served_strategy"] == "Det-Seq-Age" and json.loads(params["det_threshold"]) == 0.5
        with pytest.raises(ValueError, match="fusion model config parameters.*not JSON.*wff repo build"):
            settings_from_parameters({**params, "strategies": "{Det: [1, 0, 0]"})


class TestQueuePolicy:
    def test_every_step_of_the_ensemble_bounds_its_queue(self, built):
        """Each model the ensemble runs rejects (not delays) requests beyond serving.max_queue_size or serving.queue_timeout_us."""
        _, _, configs = built
        steps = {s.model_name for s in configs[ENSEMBLE_NAME].ensemble_scheduling.step}
        assert steps == {s.name for s in C.steps}
        for name in steps:
            policy = configs[name].dynamic_batching.default_queue_policy
            assert configs[name].HasField("dynamic_batching") and configs[name].dynamic_batching.HasField("default_queue_policy"), name
            assert (policy.max_queue_size, policy.default_timeout_microseconds) == (TINY.serving.max_queue_size, TINY.serving.queue_timeout_us)
            assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and not policy.allow_timeout_override
        assert TINY.serving.max_queue_size > 0 and TINY.serving.queue_timeout_us > 0  # bounded by default
        assert not configs[ENSEMBLE_NAME].HasField("dynamic_batching")  # an ensemble has no queue of its own

    def test_settings_reach_every_step(self, tiny_artifacts, tmp_path):
        """serving.max_queue_size / queue_timeout_us given to the build land in every step's config.pbtxt."""
        serving = dataclasses.replace(TINY.serving, max_queue_size=3, queue_timeout_us=250_000)
        out = build_repository(tmp_path / "repo", "embedded", tiny_artifacts, serving=serving)
        for step in C.steps:
            policy = read_config(out / step.name / "config.pbtxt").dynamic_batching.default_queue_policy
            assert (policy.max_queue_size, policy.default_timeout_microseconds) == (3, 250_000), step.name

    @pytest.mark.parametrize("field", ["max_queue_size", "queue_timeout_us"])
    def test_negative_is_refused(self, tiny_artifacts, tmp_path, field):
        """A negative queue bound is refused by name; 0 (unbounded) is allowed."""
        with pytest.raises(ValueError, match=f"serving.{field} is -1.*>= 0"):
            build_repository(tmp_path / "bad", "embedded", tiny_artifacts, serving=dataclasses.replace(TINY.serving, **{field: -1}))
        build_repository(tmp_path / "zero", "embedded", tiny_artifacts, serving=dataclasses.replace(TINY.serving, **{field: 0}))


class TestTargets:
    def test_model_files_per_target(self, built):
        """embedded: model.py + model.onnx; onnxruntime: model.onnx; tensorrt: points at model.plan, ONNX beside it."""
        target, out, configs = built
        for name in MODEL_STEPS:
            cfg, version = configs[name], out / name / "1"
            assert (version / "model.onnx").is_file()
            if target == "embedded":
                assert cfg.backend == "python" and (version / "model.py").is_file() and (version / "profile.json").is_file()
            elif target == "onnxruntime":
                assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("onnxruntime_onnx", "onnxruntime", "model.onnx")
            else:
                assert (cfg.platform, cfg.default_model_filename) == ("tensorrt_plan", "model.plan")
                assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
                assert not (version / "model.py").exists()
        for name in PYTHON_STEPS:
            assert {"model.py", "profile.json"} <= {p.name for p in (out / name / "1").iterdir()}
        assert {"fusion.json", "age_prior.json"} <= {p.name for p in (out / "fusion" / "1").iterdir()}
        assert (out / ENSEMBLE_NAME / "1").is_dir()

    def test_only_model_steps_differ_between_targets(self, tiny_artifacts, tmp_path):
        """Switching target changes the detector and classifier configs and nothing else."""
        texts = {}
        for target in TARGETS:
            out = build_repository(tmp_path / target, target, tiny_artifacts)
            texts[target] = {p.parent.name: p.read_text() for p in out.glob("*/config.pbtxt")}
        for name in texts["embedded"]:
            same = texts["embedded"][name] == texts["tensorrt"][name] == texts["onnxruntime"][name]
            assert same == (name not in MODEL_STEPS), name


class TestBuildErrors:
    def test_missing_artifact_is_named(self, tmp_path):
        """An artifacts folder without the models names what is missing."""
        TINY.save(tmp_path / "profile.json")
        with pytest.raises(FileNotFoundError, match="detector.onnx"):
            build_repository(tmp_path / "repo", "embedded", tmp_path)

    def test_non_empty_output_needs_overwrite(self, tmp_path):
        """An existing, non-empty OUT is only replaced with overwrite=True."""
        (tmp_path / "repo").mkdir()
        (tmp_path / "repo" / "keep").write_text("x")
        with pytest.raises(FileExistsError, match="not empty"):
            build_repository(tmp_path / "repo", "embedded", profile=TINY)
        build_repository(tmp_path / "repo", "embedded", profile=TINY, overwrite=True)
        assert not (tmp_path / "repo" / "keep").exists()

    def test_unknown_target(self, tmp_path):
        """The error lists the valid targets."""
        with pytest.raises(ValueError, match="expected one of"):
            build_repository(tmp_path / "repo", "tflite", profile=TINY)

    def test_threshold_mismatch_is_refused(self, tiny_artifacts, tmp_path):
        """fusion.json's voting threshold must be the profile's det_threshold or a value of its grid."""
        import shutil

        art = tmp_path / "art"
        shutil.copytree(tiny_artifacts, art)
        profile = load_profile(art / "profile.json")
        outside = 0.37
        assert outside != profile.fusion.det_threshold and outside not in profile.fusion.det_threshold_grid
        FusionSettings(det_threshold=outside).save(art / "fusion.json")
        with pytest.raises(ValueError, match="det_threshold_grid"):
            build_repository(tmp_path / "repo", "embedded", art)

    def test_threshold_from_the_grid_is_served(self, tiny_artifacts, tmp_path):
        """A voting threshold chosen from fusion.det_threshold_grid reaches the fusion step's parameters."""
        import shutil

        art = tmp_path / "art"
        shutil.copytree(tiny_artifacts, art)
        profile = load_profile(art / "profile.json")
        chosen = min(profile.fusion.det_threshold_grid)
        assert chosen != profile.fusion.det_threshold
        FusionSettings(det_threshold=chosen).save(art / "fusion.json")
        build_repository(tmp_path / "repo", "embedded", art)
        assert f'"{chosen!r}"' in (tmp_path / "repo" / "fusion" / "config.pbtxt").read_text()


class TestRunsWithRemovedOptions:
    """Runs trained while fusion.calibrate and serving.members existed hold those keys in profile.json
    (every run) and "calibration" in fusion.json; the options were removed (no gain measured)."""

    @staticmethod
    def old_run(tiny_artifacts, tmp_path, fusion: dict, serving: dict, calibration):
        import shutil

        art = shutil.copytree(tiny_artifacts, tmp_path / "art")
        profile = json.loads((art / "profile.json").read_text())
        profile["fusion"].update(fusion)
        profile["serving"].update(serving)
        (art / "profile.json").write_text(json.dumps(profile))
        settings = json.loads((art / "fusion.json").read_text())
        (art / "fusion.json").write_text(json.dumps({**settings, "calibration": calibration}))
        return art

    def test_a_run_that_used_neither_is_served_as_before(self, tiny_artifacts, tmp_path):
        """Their "off" values (any fusion.calibrate, serving.members "final", any members_box_iou, an
        identity calibration) are dropped on load: the repository is the one a current run gets."""
        art = self.old_run(tiny_artifacts, tmp_path, {"calibrate": False}, {"members": "final", "members_box_iou": 0.55},
                           {"d": [1.0, 0.0], "m": [1.0, 0.0]})
        old = build_repository(tmp_path / "old", "embedded", art)
        new = build_repository(tmp_path / "new", "embedded", tiny_artifacts)
        for step in ("detector", "fusion"):
            assert (old / step / "config.pbtxt").read_text() == (new / step / "config.pbtxt").read_text()
            assert load_profile(old / step / "1" / "profile.json") == load_profile(new / step / "1" / "profile.json")
        assert sorted(p.name for p in (old / "detector" / "1").iterdir()) == ["model.onnx", "model.py", "profile.json"]

    def test_fold_members_are_refused(self, tiny_artifacts, tmp_path):
        art = self.old_run(tiny_artifacts, tmp_path, {}, {"members": "folds"}, None)
        with pytest.raises(ValueError, match=r"art/profile\.json\.serving: members=\"folds\" is refused: serving\.members "
                                             r"\(serving the cross-validation fold models merged\) was removed: no gain measured"
                                             r".*delete the key to serve the final models"):
            build_repository(tmp_path / "repo", "embedded", art)

    def test_a_calibrated_fusion_is_refused(self, tiny_artifacts, tmp_path):
        art = self.old_run(tiny_artifacts, tmp_path, {"calibrate": True}, {}, {"d": [0.5, 0.1], "m": [1.2, -0.3]})
        with pytest.raises(ValueError, match=r"art/fusion\.json: \"calibration\".*wff dev refit-fusion ARTIFACTS"):
            build_repository(tmp_path / "repo", "embedded", art)

    def test_cli_names_the_file_and_what_to_do(self, tiny_artifacts, tmp_path):
        """wff repo build: one-line error on stderr, exit 1; --set of a removed key is a usage error (exit 2)."""
        art = self.old_run(tiny_artifacts, tmp_path, {}, {"members": "folds"}, None)
        result = CliRunner().invoke(main, ["repo", "build", "--artifacts", str(art), str(tmp_path / "r")])
        assert result.exit_code == 1 and result.stderr.startswith("wff: error: ") and "serving.members" in result.stderr
        for key in ("serving.members=folds", "serving.members_box_iou=0.5"):
            result = CliRunner().invoke(main, ["repo", "build", "--artifacts", str(tiny_artifacts), "--set", key, str(tmp_path / "s")])
            assert result.exit_code == 2 and f"{key.partition('=')[0]} (" in result.output and "was removed" in result.output


class TestCli:
    def test_repo_build(self, tiny_artifacts, tmp_path):
        """wff repo build writes the repository and says where."""
        result = CliRunner().invoke(main, ["repo", "build", "--target", "tensorrt", "--artifacts", str(tiny_artifacts), str(tmp_path / "r")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "r" / "detector" / "config.pbtxt").is_file()

    def test_repo_build_serving_override(self, tiny_artifacts, tmp_path):
        """--set serving.KEY=VALUE reaches the detector's config parameters and the profile the adapters read."""
        from wff.config import load_profile

        out = tmp_path / "r"
        args = ["repo", "build", "--artifacts", str(tiny_artifacts), str(out), "--set", "serving.runtime_precision=bf16"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        cfg = read_config(out / "detector" / "config.pbtxt")
        assert cfg.parameters["runtime_precision"].string_value == "bf16"
        assert load_profile(out / "detector" / "1" / "profile.json").serving.runtime_precision == "bf16"

    @pytest.mark.parametrize("override, message", [
        ("serving.runtime_precision=fp8", "serving.runtime_precision"),
        ("detector.top_k=2", "only serving.KEY=VALUE"),
    ])
    def test_repo_build_bad_override_named(self, tiny_artifacts, tmp_path, override, message):
        """An override that cannot be served, or that is not a serving setting, is refused by name before anything is written."""
        result = CliRunner().invoke(main, ["repo", "build", "--artifacts", str(tiny_artifacts), str(tmp_path / "r"), "--set", override])
        assert result.exit_code != 0 and message in result.output
        assert not (tmp_path / "r" / "detector" / "config.pbtxt").exists()

    def test_override_needs_artifacts(self, tmp_path):
        """--set without --artifacts is a usage error (a configs-only build has no trained profile to change)."""
        result = CliRunner().invoke(main, ["repo", "build", str(tmp_path / "r"), "--set", "serving.runtime_threads=2"])
        assert result.exit_code == 2 and "--set needs --artifacts" in result.output

    def test_repo_build_refuses_non_empty(self, tmp_path):
        """A non-empty OUT without --force is a clean error, not a traceback."""
        (tmp_path / "x").write_text("x")
        result = CliRunner().invoke(main, ["repo", "build", str(tmp_path)])
        assert result.exit_code == 1 and "not empty" in result.output


@pytest.mark.parametrize("step", [s.name for s in C.steps])
def test_adapters_are_thin(step):
    """Every model.py stays under the style guide's 80 lines."""
    assert len((ADAPTERS_DIR / step / "1" / "model.py").read_text().splitlines()) < MAX_ADAPTER_LINES
