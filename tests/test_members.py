"""Fold models served as one step (serving.members = "folds"): the merges, the runner, the repository."""

import dataclasses

import numpy as np
import pytest
from conftest import TINY, make_classifier_onnx, make_detector_onnx, write_artifacts

from wff.contracts import contracts_for
from wff.ensemble.members import check_members, mean_probabilities, merge_detections, merger
from wff.ensemble.pipeline import Pipeline, fold_models, fold_models_dir
from wff.ensemble.runtime import MemberRunner, OnnxRunner, member_runner

C = contracts_for(TINY)
K = TINY.detector.top_k
IOU = 0.55


def detections(rows: list[list[tuple]], k: int = K) -> dict[str, np.ndarray]:
    """Detector outputs for slices given as lists of (x1, y1, x2, y2, score, malignancy), score order."""
    n = len(rows)
    out = {
        "detector_boxes": np.zeros((n, k, 4), np.float32),
        "detector_scores": np.zeros((n, k), np.float32),
        "detector_labels": np.zeros((n, k), np.int32),
        "detector_malignancy": np.zeros((n, k), np.float32),
        "detector_count": np.zeros((n, 1), np.int32),
    }
    for b, row in enumerate(rows):
        for j, (*box, score, mal) in enumerate(row):
            out["detector_boxes"][b, j] = box
            out["detector_scores"][b, j] = score
            out["detector_malignancy"][b, j] = mal
            out["detector_labels"][b, j] = 2 if mal >= 0.5 else 1
        out["detector_count"][b, 0] = len(row)
    return out


class TestMergeDetections:
    def test_identical_members_give_the_member(self):
        """k copies of one output merge to that output (boxes, scores, malignancy, labels, count)."""
        one = detections([[(10, 10, 30, 30, 0.9, 0.8), (40, 40, 50, 60, 0.4, 0.2)], [], [(0, 0, 8, 8, 0.7, 0.5)]])
        merged = merge_detections([one] * 4, IOU)
        for name, value in one.items():
            np.testing.assert_allclose(merged[name], value, rtol=1e-6, err_msg=name)
            assert merged[name].dtype == value.dtype and merged[name].shape == value.shape

    def test_overlapping_boxes_fuse_score_weighted(self):
        """Two members' boxes with IoU >= threshold become one: score-weighted box and malignancy,
        score = sum of scores / members."""
        a = detections([[(10, 10, 30, 30, 0.8, 0.9)]])
        b = detections([[(12, 10, 32, 30, 0.2, 0.1)]])
        merged = merge_detections([a, b], IOU)
        assert merged["detector_count"].tolist() == [[1]]
        np.testing.assert_allclose(merged["detector_boxes"][0, 0], [10.4, 10, 30.4, 30], rtol=1e-5)
        np.testing.assert_allclose(merged["detector_scores"][0, 0], 0.5, rtol=1e-5)
        np.testing.assert_allclose(merged["detector_malignancy"][0, 0], 0.8 * 0.9 + 0.2 * 0.1, rtol=1e-5)
        assert merged["detector_labels"][0, 0] == 2

    def test_a_box_one_member_finds_keeps_its_share_of_the_score(self):
        """A box that one of four members finds scores a quarter of its score; disjoint boxes stay apart,
        in score order, padded after the count."""
        found = detections([[(10, 10, 30, 30, 0.8, 0.3)]])
        others = detections([[(40, 40, 60, 60, 0.6, 0.7)]])
        merged = merge_detections([found, others, others, others], IOU)
        assert merged["detector_count"].tolist() == [[2]]
        np.testing.assert_allclose(merged["detector_scores"][0, :2], [0.45, 0.2], rtol=1e-5)
        np.testing.assert_allclose(merged["detector_boxes"][0, 0], [40, 40, 60, 60])
        np.testing.assert_allclose(merged["detector_malignancy"][0, :2], [0.7, 0.3], rtol=1e-5)
        assert merged["detector_labels"][0, :2].tolist() == [2, 1]
        assert not merged["detector_scores"][0, 2:].any() and not merged["detector_labels"][0, 2:].any()

    def test_one_member_adds_at_most_one_box_to_a_cluster(self):
        """Two overlapping boxes of the same member stay two clusters (each member's NMS kept both)."""
        a = detections([[(10, 10, 30, 30, 0.9, 0.5), (11, 10, 31, 30, 0.5, 0.5)]])
        b = detections([[(10, 10, 30, 30, 0.7, 0.5)]])
        merged = merge_detections([a, b], IOU)
        assert merged["detector_count"].tolist() == [[2]]
        np.testing.assert_allclose(merged["detector_scores"][0, :2], [0.8, 0.25], rtol=1e-5)

    def test_threshold_decides_fusion(self):
        """Boxes overlapping below the IoU threshold are not fused."""
        a = detections([[(0, 0, 20, 20, 0.9, 0.5)]])
        b = detections([[(10, 0, 30, 20, 0.9, 0.5)]])  # IoU 1/3
        assert merge_detections([a, b], 0.3)["detector_count"].tolist() == [[1]]
        assert merge_detections([a, b], 0.5)["detector_count"].tolist() == [[2]]

    def test_only_the_k_best_clusters_are_kept(self):
        """More clusters than K: the K highest fused scores fill the output."""
        rows_a = [[(i * 10, 0, i * 10 + 5, 5, 0.9 - 0.1 * i, 0.5) for i in range(K)]]
        rows_b = [[(i * 10, 20, i * 10 + 5, 25, 0.85 - 0.1 * i, 0.5) for i in range(K)]]
        merged = merge_detections([detections(rows_a), detections(rows_b)], IOU)
        assert merged["detector_count"].tolist() == [[K]]
        scores = merged["detector_scores"][0]
        assert np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, sorted([0.45 - 0.05 * i for i in range(K)] + [0.425 - 0.05 * i for i in range(K)], reverse=True)[:K], rtol=1e-5)

    def test_slices_without_detections_stay_empty(self):
        empty = detections([[], []])
        merged = merge_detections([empty, empty], IOU)
        assert merged["detector_count"].tolist() == [[0], [0]] and not merged["detector_boxes"].any()

    def test_bad_threshold_names_the_setting(self):
        one = detections([[(0, 0, 1, 1, 0.5, 0.5)]])
        with pytest.raises(ValueError, match="serving.members_box_iou"):
            merge_detections([one, one], 0.0)
        with pytest.raises(ValueError, match="serving.members_box_iou"):
            merger("detector", 1.5)  # when a step loads, before any request


class TestMergeClassifier:
    def test_mean_of_the_members(self):
        a = {"classifier_probs": np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)}
        b = {"classifier_probs": np.array([[0.4, 0.6], [1.0, 0.0]], np.float32)}
        out = mean_probabilities([a, b])
        np.testing.assert_allclose(out["classifier_probs"], [[0.3, 0.7], [0.8, 0.2]], rtol=1e-6)
        assert out["classifier_probs"].dtype == np.float32

    def test_no_merge_for_other_steps(self):
        with pytest.raises(ValueError, match="crop"):
            merger("crop", IOU)

    def test_members_setting_is_checked(self):
        check_members("folds")
        with pytest.raises(ValueError, match=r"serving.members: unknown value 'fold'"):
            check_members("fold")


@pytest.fixture(scope="module")
def fold_artifacts(tmp_path_factory):
    """Stand-in artifacts of the tiny profile with fold models whose classifiers differ from the final one
    (P(malignant) shifted by +0.05 and +0.15), as wff train writes them."""
    profile = TINY.replace(train={"cv_folds": 2})
    out = write_artifacts(profile, tmp_path_factory.mktemp("fold-artifacts"))
    for k, shift in enumerate((0.05, 0.15)):
        fold = fold_models_dir(out, k)
        fold.mkdir(parents=True)
        make_detector_onnx(profile, fold / "detector.onnx")
        make_classifier_onnx(profile, fold / "classifier.onnx", shift=shift)
    return out


class TestMemberRunner:
    def test_runs_every_member_and_merges(self, fold_artifacts, tmp_path):
        paths = [fold_models_dir(fold_artifacts, k) / "classifier.onnx" for k in range(2)]
        runner = member_runner("onnxruntime", paths, C.classifier, 1, None, "f32", IOU)
        assert isinstance(runner, MemberRunner) and runner.input_spec.name == "classifier_clip"
        clips = np.full((3, *C.classifier.inputs[0].dims), 0.5, np.float32)
        np.testing.assert_allclose(runner(clips)["classifier_probs"][:, 1], 0.6, rtol=1e-5)
        single = member_runner("onnxruntime", paths[:1], C.classifier, 1, None, "f32", IOU)
        assert isinstance(single, OnnxRunner)

    def test_members_of_one_step_only(self, fold_artifacts):
        det = OnnxRunner(fold_models_dir(fold_artifacts, 0) / "detector.onnx", C.detector, 1)
        cls = OnnxRunner(fold_models_dir(fold_artifacts, 0) / "classifier.onnx", C.classifier, 1)
        with pytest.raises(ValueError, match="one step"):
            MemberRunner([det, cls], IOU)

    def test_in_process_pipeline_serves_the_folds(self, fold_artifacts, dicom_patient):
        """Pipeline.from_artifacts(members="folds"): M is the mean of the fold classifiers, not the final one's."""
        from wff.client.grpc_client import read_patient_files

        files = read_patient_files(dicom_patient)
        final = Pipeline.from_artifacts(fold_artifacts, threads=1).diagnose_files(files)
        folds = Pipeline.from_artifacts(fold_artifacts, threads=1, members="folds").diagnose_files(files)
        np.testing.assert_allclose(folds.series_m, final.series_m + 0.1, atol=1e-5)
        np.testing.assert_allclose(folds.slice_d, final.slice_d, atol=1e-6, equal_nan=True)

    def test_missing_fold_models_say_what_to_run(self, tmp_path):
        artifacts = write_artifacts(TINY, tmp_path / "artifacts")
        with pytest.raises(ValueError, match="wff dev export-folds"):
            fold_models(artifacts, TINY, "detector")


class TestRepository:
    def test_folds_are_copied_beside_the_final_model(self, fold_artifacts, tmp_path):
        from wff.serving.repository import FOLD_MODEL, build_repository, member_models

        serving = dataclasses.replace(TINY.serving, members="folds")
        repo = build_repository(tmp_path / "repo", "embedded", fold_artifacts, serving=serving)
        for step in ("detector", "classifier"):
            version = repo / step / "1"
            assert (version / "model.onnx").is_file()
            assert member_models(version, "folds") == [version / FOLD_MODEL.format(k) for k in (1, 2)]
            assert (version / FOLD_MODEL.format(2)).read_bytes() == (fold_models_dir(fold_artifacts, 1) / f"{step}.onnx").read_bytes()
            assert member_models(version, "final") == [version / "model.onnx"]

    def test_bad_box_iou_is_refused_at_build(self, fold_artifacts, tmp_path):
        from wff.serving.repository import build_repository

        serving = dataclasses.replace(TINY.serving, members="folds", members_box_iou=0.0)
        with pytest.raises(ValueError, match="serving.members_box_iou"):
            build_repository(tmp_path / "repo", "embedded", fold_artifacts, serving=serving)

    def test_other_targets_refuse_folds(self, fold_artifacts, tmp_path):
        from wff.serving.repository import build_repository

        serving = dataclasses.replace(TINY.serving, members="folds")
        with pytest.raises(ValueError, match="embedded target only"):
            build_repository(tmp_path / "repo", "tensorrt", fold_artifacts, serving=serving)

    def test_version_dir_without_folds(self, tmp_path):
        from wff.serving.repository import member_models

        (tmp_path / "model.onnx").write_bytes(b"")
        with pytest.raises(ValueError, match="rebuild with wff repo build"):
            member_models(tmp_path, "folds")
        (tmp_path / "model.fold2.onnx").write_bytes(b"")
        with pytest.raises(ValueError, match=r"model.fold2.onnx"):
            member_models(tmp_path, "folds")
