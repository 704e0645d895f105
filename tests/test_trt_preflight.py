"""wff.serving.trt_preflight: what each plan must be, and whether TensorRT 10 can build it.

Profile shapes and plan specs from the repository configs, and TensorRT 10 op support of
every graph our exporter writes; no TensorRT or GPU needed.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from wff.config import PAPER
from wff.ensemble.fusion import FusionSettings
from wff.serving import trt_preflight
from wff.serving.repository import build_repository, config_text, read_config, repository_configs

# The constraints tensorrt_onnx_ops.json must document (the issue asks for each of them).
REQUIRED_NOTES = {"dynamic_shapes", "TopK", "RoiAlign", "NonMaxSuppression", "NonZero", "DeformConv", "int64", "Resize", "GridSample"}


def _configs(profile):
    return repository_configs(profile, "tensorrt", FusionSettings(profile.fusion.strategy, profile.fusion.det_threshold))


class TestProfileShapes:
    def test_tiny_detector_from_config(self, tiny_profile):
        """Batch 1 / largest preferred (64) / max_batch_size (96); other dims from the contract."""
        (shape,) = trt_preflight.profile_shapes(_configs(tiny_profile)["detector"])
        assert shape == trt_preflight.InputProfile("detector_image", (1, 1, 64, 64), (64, 1, 64, 64), (96, 1, 64, 64))

    def test_paper_classifier_and_detector(self):
        """The paper profile: 512-px slices, 16 x 112 x 112 clips."""
        configs = _configs(PAPER)
        (det,) = trt_preflight.profile_shapes(configs["detector"])
        (cls,) = trt_preflight.profile_shapes(configs["classifier"])
        assert (det.min, det.opt, det.max) == ((1, 1, 512, 512), (64, 1, 512, 512), (96, 1, 512, 512))
        assert (cls.min, cls.opt, cls.max) == ((1, 1, 16, 112, 112), (8, 1, 16, 112, 112), (8, 1, 16, 112, 112))

    @pytest.mark.parametrize(
        "max_batch, preferred, expected",
        [(96, (32, 64), 64), (96, (128,), 96), (8, (), 8), (6, (4, 8), 4), (1, (1,), 1)],
    )
    def test_opt_batch_is_largest_usable_preferred(self, max_batch, preferred, expected):
        """Preferred sizes above max_batch_size are ignored; none left means opt = max."""
        assert trt_preflight.choose_opt_batch(max_batch, preferred) == expected

    def test_explicit_opt_out_of_range(self, tiny_profile):
        """An opt batch beyond max_batch_size is refused with the allowed range."""
        with pytest.raises(trt_preflight.PlanError, match=r"outside 1\.\.96"):
            trt_preflight.profile_shapes(_configs(tiny_profile)["detector"], opt_batch=97)

    def test_non_batching_model_refused(self, tiny_profile):
        """max_batch_size 0 (a Python step) cannot get a plan."""
        with pytest.raises(trt_preflight.PlanError, match="max_batch_size is 0"):
            trt_preflight.profile_shapes(_configs(tiny_profile)["crop"])

    def test_variable_non_batch_dim_refused(self, tiny_profile):
        """Only the batch dim may vary."""
        cfg = _configs(tiny_profile)["detector"]
        cfg.input[0].dims[1] = -1
        with pytest.raises(trt_preflight.PlanError, match="only the batch dim"):
            trt_preflight.profile_shapes(cfg)

    def test_plan_spec_reads_the_repository(self, trt_repo):
        """plan_spec: config.pbtxt + model.onnx + contracts; INT32 outputs are the discrete ones."""
        spec = trt_preflight.plan_spec(trt_repo, "detector")
        assert spec.plan == trt_repo / "detector" / "1" / "model.plan"
        assert spec.onnx.is_file() and spec.max_batch_size == 96 and spec.opt_batch == 64
        assert spec.discrete_outputs == ("detector_labels", "detector_count")
        assert trt_preflight.plan_spec(trt_repo, "classifier").inputs[0].max == (8, 1, 4, 16, 16)

    def test_config_edited_away_from_contracts(self, trt_repo, tmp_path):
        """A config.pbtxt whose dims disagree with profile.json's contracts is refused."""
        repo = tmp_path / "repo"
        shutil.copytree(trt_repo, repo)
        path = repo / "classifier" / "config.pbtxt"
        cfg = read_config(path)
        cfg.input[0].dims[2] = 32
        path.write_text(config_text(cfg))
        with pytest.raises(trt_preflight.PlanError, match="does not match wff.contracts"):
            trt_preflight.plan_spec(repo, "classifier")

    def test_embedded_repository_refused(self, tiny_artifacts, tmp_path):
        """A repository built for another target says how to build the right one."""
        repo = build_repository(tmp_path / "repo", "embedded", tiny_artifacts)
        with pytest.raises(trt_preflight.PlanError, match="--target tensorrt"):
            trt_preflight.plan_spec(repo, "detector")


# --------------------------------------------------------------------------- op support


@pytest.fixture(scope="module")
def ops_table():
    return trt_preflight.load_ops_table()


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
        assert trt_preflight.onnx_tensorrt_issues(exported_graphs[model], ops_table) == []

    @pytest.mark.parametrize("profile", ["small", "paper"])
    def test_exported_detector_roialign_and_topk(self, exported_graphs, profile):
        """The constraints that matter hold in the real detector: constant K, explicit sampling_ratio."""
        model = onnx.load(str(exported_graphs[f"{profile}-detector"]))
        consts = trt_preflight._constants(model.graph)
        topk = [n for n in model.graph.node if n.op_type == "TopK"]
        roi = [n for n in model.graph.node if n.op_type == "RoiAlign"]
        assert topk and all(n.input[1] in consts for n in topk)
        attrs = [trt_preflight._attrs(n) for n in roi]
        assert roi and all(a.get("sampling_ratio", 0) > 0 and a.get("mode", "avg") == "avg" for a in attrs)

    def test_paper_detector_keeps_deformable_convolutions(self, exported_graphs):
        """The paper detector exports its deformable convolutions as ONNX DeformConv, which TensorRT 10 parses."""
        from wff.training.export import onnx_op_types

        assert "DeformConv" in onnx_op_types(exported_graphs["paper-detector"])

    def test_stand_in_graphs_pass(self, trt_repo, ops_table):
        """The repository's stand-in graphs (tests/conftest.py) pass the same check."""
        for model in ("detector", "classifier"):
            assert trt_preflight.onnx_tensorrt_issues(trt_repo / model / "1" / "model.onnx", ops_table) == []


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
        issues = trt_preflight.onnx_tensorrt_issues(_graph(nodes, [_io("x")], [_io("v")]), ops_table)
        assert any("TopK" in i and "not a build-time constant" in i for i in issues)

    def test_topk_k_too_large(self, ops_table):
        """A constant K of 5000 is past the parser's 3840."""
        k = onnx.numpy_helper.from_array(np.array([5000], np.int64), "k")
        nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"])]
        model = _graph(nodes, [_io("x", ("batch", 6000))], [_io("v", ("batch", 5000))], [k])
        issues = trt_preflight.onnx_tensorrt_issues(model, ops_table)
        assert any("K = 5000 is not below 3840" in i for i in issues)

    def test_roialign_without_sampling_ratio(self, ops_table):
        """RoiAlign relying on ONNX's default sampling_ratio 0 is flagged (TensorRT defaults to 1)."""
        nodes = [helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], output_height=7, output_width=7)]
        rois = onnx.numpy_helper.from_array(np.zeros((2, 4), np.float32), "rois")
        idx = onnx.numpy_helper.from_array(np.zeros(2, np.int64), "idx")
        model = _graph(nodes, [_io("x", ("batch", 8, 16, 16))], [_io("y", ("batch", 8, 7, 7))], [rois, idx])
        assert any("sampling_ratio must be set explicitly" in i for i in trt_preflight.onnx_tensorrt_issues(model, ops_table))

    def test_data_dependent_unsupported_and_custom_ops(self, ops_table):
        """NonZero (data-dependent), Unique (unsupported) and a custom-domain op are each flagged."""
        nodes = [
            helper.make_node("NonZero", ["x"], ["nz"]),
            helper.make_node("Unique", ["x"], ["u"]),
            helper.make_node("MyOp", ["x"], ["y"], domain="com.example"),
        ]
        model = _graph(nodes, [_io("x")], [_io("y")])
        model.opset_import.append(helper.make_opsetid("com.example", 1))
        issues = trt_preflight.onnx_tensorrt_issues(model, ops_table)
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
        issues = trt_preflight.onnx_tensorrt_issues(model, ops_table)
        assert any("Resize" in i and "cubic" in i for i in issues)
        assert any("element type DOUBLE" in i for i in issues)
        assert any("dynamic dims [0, 2]" in i for i in issues)

    def test_opset_out_of_range(self, ops_table):
        """An opset newer than the parser's range is flagged."""
        model = _graph([helper.make_node("Relu", ["x"], ["y"])], [_io("x")], [_io("y")], opset=22)
        assert any("opset 22" in i for i in trt_preflight.onnx_tensorrt_issues(model, ops_table))

