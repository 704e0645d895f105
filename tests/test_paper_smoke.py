"""The paper profile end to end on CPU: a few optimiser steps on tiny inputs, exported and run.

The architecture is the paper's (ResNeXt101-32x8d with deformable convolutions in conv3-conv5,
five-level FPN, 3D ResNeXt-101); only the input sizes, the proposal counts, the step count and
the fold count are shrunk, so the full-size code path (training, cross-validation, ONNX export with DeformConv,
ONNX Runtime parity, the in-process pipeline over the exported graphs) runs in CI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from wff.config import PAPER, load_profile
from wff.ensemble.fusion import load_fusion_settings
from wff.ensemble.pipeline import Pipeline
from wff.training.cv import choose_fusion
from wff.training.dataset import load_records
from wff.training.export import onnx_op_types
from wff.training.synth import synthesize_dataset
from wff.training.train import CV_COMPONENTS, PARITY_ATOL, read_cv_components, run_training

PAPER_SMOKE = PAPER.replace(
    image={"size": 64},
    detector={"batch_size": 2, "rpn_pre_nms_top_n": 100, "rpn_post_nms_top_n": 32, "top_k": 8},
    classifier={"clip_len": 4, "crop_size": 16, "batch_size": 2},
    train={"cv_folds": 2, "max_steps": 2, "save_fold_models": False},  # full-size fold checkpoints: about 1 GB
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    data = synthesize_dataset(root / "data", 4, 2, seed=5)
    messages: list[str] = []
    artifacts = run_training(data, root / "artifacts", PAPER_SMOKE, progress=messages.append)
    return data, artifacts, messages


class TestPaperProfileSmoke:
    def test_every_fit_stops_at_max_steps(self, paper_run):
        """Two folds and the final fit, each detector and classifier capped at 2 optimiser steps."""
        _, _, messages = paper_run
        for tag in ("fold 1/2", "fold 2/2", "final"):
            for model in ("detector", "classifier"):
                steps = [m for m in messages if m.startswith(f"{tag} {model}: step")]
                assert steps and steps[-1].startswith(f"{tag} {model}: step 2/2"), steps

    def test_artifacts_keep_the_paper_architecture(self, paper_run):
        """profile.json is the paper's; the detector ONNX carries the deformable convolutions."""
        _, artifacts, _ = paper_run
        profile = load_profile(artifacts / "profile.json")
        assert profile.detector.backbone == "resnext101_dcn" and profile.detector.fpn_levels == 5
        assert profile.classifier.arch == "resnext3d_101" and profile.classifier.layers == (3, 4, 23, 3)
        assert "DeformConv" in onnx_op_types(artifacts / "detector.onnx")

    def test_onnx_runtime_matches_pytorch(self, paper_run):
        """The training run's own parity check: ONNX Runtime vs PyTorch on labelled tumour slices and clips."""
        _, artifacts, _ = paper_run
        parity = json.loads((artifacts / "train_report.json").read_text())["onnx_parity"]
        assert parity["detector_checked_slices"] > 0 and parity["classifier_checked_clips"] > 0
        assert parity["detector_max_abs_diff"] <= PARITY_ATOL * 100
        assert parity["classifier_max_abs_diff"] <= PARITY_ATOL

    def test_cv_components_reproduce_the_chosen_weights(self, paper_run):
        """cv_components.json holds every training patient's out-of-fold inputs, label and fold;
        choosing again on it gives fusion.json's weights."""
        data, artifacts, _ = paper_run
        comps, labels, folds = read_cv_components(artifacts / CV_COMPONENTS)
        train = load_records(data, split="train")
        assert labels.tolist() == [r.label for r in train]
        assert sorted(set(folds.tolist())) == [0, 1] and len(comps) == len(train)
        settings = load_fusion_settings(artifacts / "fusion.json")
        again = choose_fusion(comps, labels, PAPER_SMOKE.fusion)  # what run_training called
        assert again.strategies == settings.strategies

    def test_exported_paper_models_diagnose_a_patient(self, paper_run):
        """The in-process ensemble over the exported ONNX graphs gives a diagnosis for a test patient."""
        data, artifacts, _ = paper_run
        record = load_records(data, split="test")[0]
        files = [(p.name, p.read_bytes()) for p in sorted(record.path.rglob("*.dcm"))]
        dx = Pipeline.from_artifacts(artifacts).diagnose_files(files, age=float(record.age))
        assert dx.label in ("benign", "malignant") and 0.0 <= dx.p_malignant <= 1.0
        assert len(dx.series_m) >= 1 and np.all((dx.series_m >= 0) & (dx.series_m <= 1))

    def test_onnx_runtime_matches_pytorch_on_the_test_split(self, paper_run):
        """wff dev parity on the paper profile (DeformConv in the graph): both test patients, every slice and
        clip, within the tolerance and with no decision changed."""
        from wff.training.parity import format_parity, split_parity

        data, artifacts, _ = paper_run
        summary = split_parity(data, artifacts, "test")
        assert summary["patients"] == 2 and summary["passed"], format_parity(summary)
        assert summary["detector"]["slices"] > 0 and summary["classifier"]["clips"] > 0
