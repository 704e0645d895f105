"""ONNX export of the small-profile detector and classifier (wff.training.export), checked with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from wff.contracts import contracts_for
from wff.training.detector_graph import DetectorGraph
from wff.training.export import FORBIDDEN_OPS, OnnxParityError, check_onnx, export_classifier, export_detector, onnx_op_types
from wff.training.models import build_classifier, build_detector

torch.set_num_threads(2)

DETECTOR_ATOL = 1e-3  # pixels for boxes, probability for scores/malignancy; labels/count must match exactly
CLASSIFIER_ATOL = 1e-5


@pytest.fixture(scope="module")
def detector(tiny_profile):
    torch.manual_seed(0)
    return build_detector(tiny_profile).eval()


@pytest.fixture(scope="module")
def detector_onnx(detector, tiny_profile, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "detector.onnx"
    ops = export_detector(detector, tiny_profile, path)
    return path, ops


@pytest.fixture(scope="module")
def classifier_onnx(tiny_profile, tmp_path_factory):
    torch.manual_seed(0)
    model = build_classifier(tiny_profile).eval()
    path = tmp_path_factory.mktemp("onnx") / "classifier.onnx"
    export_classifier(model, tiny_profile, path)
    return path, model


class TestExportDetector:
    def test_matches_pytorch_at_batch_1_and_3(self, detector_onnx, detector, tiny_profile):
        """ONNX Runtime reproduces DetectorGraph at batch 3 and batch 1."""
        path, _ = detector_onnx
        images = torch.rand(3, 1, tiny_profile.image.size, tiny_profile.image.size)
        assert check_onnx(path, DetectorGraph(detector, tiny_profile), images, atol=DETECTOR_ATOL) <= DETECTOR_ATOL

    def test_graph_is_static(self, detector_onnx):
        """No NonZero / Loop / If / NonMaxSuppression: TensorRT gets a static graph."""
        path, ops = detector_onnx
        assert ops == onnx_op_types(path)
        assert not ops & FORBIDDEN_OPS
        assert {"TopK", "RoiAlign", "Conv"} <= ops

    def test_signature_is_the_contract(self, detector_onnx, tiny_profile):
        """Names, dtypes (int32 labels/count) and dims come from wff.contracts; only the batch dim is dynamic."""
        path, _ = detector_onnx
        graph = onnx.load(str(path)).graph
        contract = contracts_for(tiny_profile).detector
        assert [i.name for i in graph.input] == ["detector_image"]
        assert [o.name for o in graph.output] == [s.name for s in contract.outputs]
        for out, spec in zip(graph.output, contract.outputs):
            t = out.type.tensor_type
            assert t.elem_type == (onnx.TensorProto.INT32 if spec.data_type == "TYPE_INT32" else onnx.TensorProto.FLOAT)
            assert t.shape.dim[0].dim_param == "batch"
            assert tuple(d.dim_value for d in t.shape.dim[1:]) == spec.dims


class TestExportClassifier:
    def test_matches_pytorch_at_batch_1_and_3(self, classifier_onnx, tiny_profile):
        """Softmax probabilities from ONNX Runtime equal PyTorch's."""
        path, model = classifier_onnx
        c = tiny_profile.classifier
        clips = torch.rand(3, 1, c.clip_len, c.crop_size, c.crop_size)
        assert check_onnx(path, model, clips, atol=CLASSIFIER_ATOL) <= CLASSIFIER_ATOL
        assert onnx_op_types(path).isdisjoint(FORBIDDEN_OPS)

    def test_parity_failure_names_the_output(self, classifier_onnx, tiny_profile):
        """A module that disagrees with the file raises OnnxParityError naming the tensor."""
        path, _ = classifier_onnx
        c = tiny_profile.classifier

        class Flipped(torch.nn.Module):
            def forward(self, clip):
                return torch.tensor([[0.0, 1.0]]).repeat(len(clip), 1)

        with pytest.raises(OnnxParityError, match="classifier_probs differs"):
            check_onnx(path, Flipped(), torch.rand(2, 1, c.clip_len, c.crop_size, c.crop_size), atol=CLASSIFIER_ATOL)

    def test_input_is_named_by_contract(self, classifier_onnx, tiny_profile):
        path, _ = classifier_onnx
        graph = onnx.load(str(path)).graph
        c = tiny_profile.classifier
        assert graph.input[0].name == "classifier_clip"
        assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [1, c.clip_len, c.crop_size, c.crop_size]
        assert np.dtype(onnx.helper.tensor_dtype_to_np_dtype(graph.output[0].type.tensor_type.elem_type)) == np.float32
