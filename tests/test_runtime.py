"""OnnxRunner: ONNX Runtime over a step's exported model, checked against the contract."""

import numpy as np
import pytest
from conftest import TINY, make_classifier_onnx, make_detector_onnx

from wff.contracts import contracts_for
from wff.ensemble.runtime import OnnxRunner, warm_up

C = contracts_for(TINY)
S = TINY.image.size
K = TINY.detector.top_k


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return OnnxRunner(make_detector_onnx(TINY, tmp_path_factory.mktemp("det") / "d.onnx"), C.detector, threads=1)


class TestOnnxRunner:
    def test_outputs_keyed_by_contract(self, detector):
        """Every contract output comes back with the batch dim and the contract dtype."""
        batch = np.full((3, 1, S, S), 0.25, np.float32)
        out = detector(batch)
        assert list(out) == [o.name for o in C.detector.outputs]
        for spec in C.detector.outputs:
            assert out[spec.name].shape == (3, *spec.dims) and out[spec.name].dtype == spec.numpy_dtype
        np.testing.assert_allclose(out["detector_malignancy"], 0.25)
        assert out["detector_count"].tolist() == [[2]] * 3

    def test_empty_batch_gives_empty_outputs(self, detector):
        """A zero-slice batch returns zero-length outputs without running the session."""
        out = detector(np.zeros((0, 1, S, S), np.float32))
        assert out["detector_boxes"].shape == (0, K, 4)

    @pytest.mark.parametrize(
        "batch, match",
        [
            (np.zeros((2, 1, S, S), np.float64), "dtype float64, expected float32"),
            (np.zeros((2, S, S), np.float32), r"shape \(2, 64, 64\), expected \('B', 1, 64, 64\)"),
            (np.zeros((2, 1, S, S + 1), np.float32), "shape"),
            ([[0.0]], "numpy array"),
        ],
    )
    def test_bad_input_is_value_error(self, detector, batch, match):
        """Wrong dtype, rank or dims raise ValueError naming the tensor and what is expected."""
        with pytest.raises(ValueError, match=match):
            detector(batch)

    def test_model_with_other_names_is_rejected(self, tmp_path):
        """Loading a classifier graph as the detector fails with the names on both sides."""
        path = make_classifier_onnx(TINY, tmp_path / "c.onnx")
        with pytest.raises(ValueError, match="contract expects \\['detector_image'\\]"):
            OnnxRunner(path, C.detector, threads=1)

    def test_missing_file_is_value_error(self, tmp_path):
        """A missing model file names the path and the step."""
        with pytest.raises(ValueError, match="cannot load ONNX model for step 'classifier'"):
            OnnxRunner(tmp_path / "absent.onnx", C.classifier, threads=1)

    def test_classifier_probabilities(self, tmp_path):
        """The stand-in classifier returns (1 - mean, mean) per clip."""
        runner = OnnxRunner(make_classifier_onnx(TINY, tmp_path / "c.onnx"), C.classifier, threads=1)
        n, c = TINY.classifier.clip_len, TINY.classifier.crop_size
        clips = np.stack([np.full((1, n, c, c), v, np.float32) for v in (0.2, 0.7)])
        np.testing.assert_allclose(runner(clips)["classifier_probs"], [[0.8, 0.2], [0.3, 0.7]], atol=1e-6)


class TestWarmUp:
    def test_every_batch_size_once(self, tmp_path):
        """warm_up runs the runner at batch sizes 1..max_items, with the contract's input shape and dtype."""
        runner = OnnxRunner(make_detector_onnx(TINY, tmp_path / "d.onnx"), C.detector, threads=1, chunk=4)
        seen = []
        real = runner._run
        runner._run = lambda batch: (seen.append(batch.shape), real(batch))[1]
        assert warm_up(runner, 4) == 4
        assert seen == [(n, 1, TINY.image.size, TINY.image.size) for n in range(1, 5)]
