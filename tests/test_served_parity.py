"""The served ensemble on a tiny TRAINED model equals the in-process pipeline, patient by patient.

A tiny synthetic dataset is generated and a small model trained on it (a few optimiser steps,
two folds) during the session; the embedded repository is served by the real tritonserver.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from conftest import serve_embedded

from wff.client.grpc_client import DiagnosisClient, read_patient_files
from wff.client.metrics import fetch_metrics, per_model
from wff.config import SMALL
from wff.ensemble.pipeline import Pipeline
from wff.training.dataset import load_records
from wff.training.synth import synthesize_dataset
from wff.training.train import run_training

METRICS_PERIOD_S = 2.5  # just over Triton's default metrics interval (2000 ms)
METRICS_REFRESH_S = 10.0  # longest wait for the metrics endpoint to show a finished request
P_ATOL = 1e-3  # served vs in-process |P(malignant)|; batching may reorder float sums
TINY_TRAINED = SMALL.replace(
    image={"size": 128},
    detector={"epochs": 1, "batch_size": 4, "anchor_sizes": (8, 16, 32, 64), "rpn_post_nms_top_n": 24},
    classifier={"epochs": 1, "batch_size": 4, "clip_len": 8, "crop_size": 32},
    train={"cv_folds": 2},
)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = synthesize_dataset(root / "data", 6, 4, seed=3)
    artifacts = run_training(data, root / "artifacts", TINY_TRAINED)
    return data, artifacts


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    _, artifacts = trained
    yield from serve_embedded(artifacts, tmp_path_factory, "repo")


def settled_counts(url: str) -> dict:
    """Metrics once two reads a refresh period apart agree (earlier requests all counted)."""
    previous = per_model(fetch_metrics(url))
    while True:
        time.sleep(METRICS_PERIOD_S)
        current = per_model(fetch_metrics(url))
        if current == previous:
            return current
        previous = current


class TestServedParity:
    def test_every_test_patient_matches_in_process(self, trained, served):
        """Same label and |dP| <= P_ATOL for every test patient; same votes and components."""
        data, artifacts = trained
        pipeline = Pipeline.from_artifacts(artifacts)
        records = load_records(data, "test")
        assert len(records) == 4
        with DiagnosisClient(served.grpc_url) as client:
            for record in records:
                files = read_patient_files(record.path)
                remote = client.diagnose(files, age=record.age)
                local = pipeline.diagnose_files(files, age=record.age)
                assert remote.label == local.label, record.patient_id
                assert abs(remote.p_malignant - local.p_malignant) <= P_ATOL, record.patient_id
                np.testing.assert_array_equal(remote.series_votes, local.series_votes)
                np.testing.assert_allclose(remote.series_m, local.series_m, atol=P_ATOL)
                np.testing.assert_allclose(remote.slice_d, local.slice_d, atol=P_ATOL, equal_nan=True)
                assert math.isclose(remote.age_a, local.age_a, abs_tol=1e-6)

    def test_metrics_count_every_model(self, trained, served):
        """After a diagnosis, Triton's metrics count a request for each step and the ensemble."""
        data, _ = trained
        record = load_records(data, "test")[0]
        before = settled_counts(served.metrics_url)
        with DiagnosisClient(served.grpc_url) as client:
            client.diagnose(read_patient_files(record.path), age=None)
        models = ("wff_diagnosis", "preprocess", "detector", "crop", "classifier", "fusion")

        def counted(after):
            return all(after.get(m, {}).get("success", 0) >= before.get(m, {}).get("success", 0) + 1 for m in models)

        deadline = time.monotonic() + METRICS_REFRESH_S  # Triton refreshes its counters periodically
        after = per_model(fetch_metrics(served.metrics_url))
        while not counted(after) and time.monotonic() < deadline:
            time.sleep(0.25)
            after = per_model(fetch_metrics(served.metrics_url))
        for model in models:
            assert after[model]["success"] >= before.get(model, {}).get("success", 0) + 1, model


class TestFoldModels:
    def test_fold_checkpoints_reproduce_the_out_of_fold_components(self, trained):
        """folds/fold<k>/ holds the checkpoints behind cv_components.json (and no ONNX export: only the final
        models are served): re-diagnosing each fold's held-out patients with them gives the same components."""
        from wff.ensemble.age_prior import AgePrior
        from wff.training.checkpoint import load_classifier, load_detector
        from wff.training.train import CV_COMPONENTS, fold_models_dir, load_split, out_of_fold_components, read_cv_components

        data, artifacts = trained
        assert sorted(p.name for p in fold_models_dir(artifacts, 0).iterdir()) == ["classifier.pt", "detector.pt"]
        assert "fold_onnx_parity" not in json.loads((artifacts / "train_report.json").read_text())
        comps, labels, folds = read_cv_components(artifacts / CV_COMPONENTS)
        patients = load_split(data, "train", TINY_TRAINED, lambda _: None)
        ages = np.array([p.record.age for p in patients], np.float64)
        assert sorted(set(folds.tolist())) == list(range(TINY_TRAINED.train.cv_folds))
        for k in range(TINY_TRAINED.train.cv_folds):
            held_out = np.flatnonzero(folds == k)
            keep = np.flatnonzero(folds != k)
            det, profile = load_detector(fold_models_dir(artifacts, k) / "detector.pt")
            cls, _ = load_classifier(fold_models_dir(artifacts, k) / "classifier.pt")
            prior = AgePrior.fit(ages[keep], labels[keep], profile.age)
            again = out_of_fold_components([patients[i] for i in held_out], det, cls, prior, profile, "cpu")
            for i, c in zip(held_out, again):
                np.testing.assert_allclose(c.slice_d, comps[i].slice_d, atol=1e-5, equal_nan=True)
                np.testing.assert_allclose(c.slice_score, comps[i].slice_score, atol=1e-5)
                np.testing.assert_allclose(c.series_m, comps[i].series_m, atol=1e-5)
                assert math.isclose(c.age_a, comps[i].age_a, abs_tol=1e-6)


class TestReusedDetectors:
    def test_classifier_only_run_keeps_every_detector_and_its_components(self, trained, tmp_path):
        """--detectors-from: a run with another clip length reuses each fold's and the final detector
        unchanged, so its out-of-fold detector components equal the source run's."""
        import torch

        from wff.training.checkpoint import load_checkpoint
        from wff.training.train import CV_COMPONENTS, fold_models_dir, read_cv_components

        data, source = trained
        profile = TINY_TRAINED.replace(classifier={"clip_len": 4})
        artifacts = run_training(data, tmp_path / "artifacts", profile, detectors_from=source)
        pairs = [(fold_models_dir(source, k), fold_models_dir(artifacts, k)) for k in range(TINY_TRAINED.train.cv_folds)]
        for before, after in pairs + [(source, artifacts)]:
            old, _ = load_checkpoint(before / "detector.pt", "detector")
            new, _ = load_checkpoint(after / "detector.pt", "detector")
            assert old["model"].keys() == new["model"].keys()
            assert all(torch.equal(old["model"][k], new["model"][k]) for k in old["model"])
        ours, _, _ = read_cv_components(artifacts / CV_COMPONENTS)
        theirs, _, _ = read_cv_components(source / CV_COMPONENTS)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a.slice_d, b.slice_d, atol=1e-6, equal_nan=True)
            np.testing.assert_allclose(a.slice_score, b.slice_score, atol=1e-6)
        report = (artifacts / "train_report.json").read_text()
        assert str(source / "detector.pt") in report

    def test_other_detector_settings_are_refused(self, trained, tmp_path):
        """A detector trained with other settings is not reused: the error names the setting."""
        data, source = trained
        profile = TINY_TRAINED.replace(detector={"epochs": 2})
        with pytest.raises(ValueError, match=r"detector\.epochs"):
            run_training(data, tmp_path / "artifacts", profile, detectors_from=source)

    def test_other_patients_are_refused(self, trained):
        """A detector recorded as trained on other patients is not reused."""
        from wff.training.train import reuse_detector

        _, source = trained
        with pytest.raises(ValueError, match="other patients"):
            reuse_detector(source / "detector.pt", TINY_TRAINED, "0" * 16)


class TestReusedFinalModels:
    def test_cv_only_run_keeps_the_final_models(self, trained, tmp_path):
        """--final-from: a run with full-length fold models (train.cv_epoch_scale 1) reuses the final
        detector and classifier unchanged and trains only the folds."""
        import torch

        from wff.training.checkpoint import load_checkpoint

        data, source = trained
        profile = TINY_TRAINED.replace(train={"cv_epoch_scale": 1.0})
        artifacts = run_training(data, tmp_path / "artifacts", profile, final_from=source)
        for kind in ("detector", "classifier"):
            old, _ = load_checkpoint(source / f"{kind}.pt", kind)
            new, _ = load_checkpoint(artifacts / f"{kind}.pt", kind)
            assert all(torch.equal(old["model"][k], new["model"][k]) for k in old["model"])
        report = json.loads((artifacts / "train_report.json").read_text())
        assert report["timings"]["final"]["reused_from"] == str(source)

    def test_other_classifier_settings_are_refused(self, trained, tmp_path):
        data, source = trained
        profile = TINY_TRAINED.replace(classifier={"clip_len": 4})
        with pytest.raises(ValueError, match=r"classifier\.clip_len"):
            run_training(data, tmp_path / "artifacts", profile, final_from=source)

    def test_not_with_detectors_from(self, trained, tmp_path):
        data, source = trained
        with pytest.raises(ValueError, match="not both"):
            run_training(data, tmp_path / "artifacts", TINY_TRAINED, detectors_from=source, final_from=source)


class TestSplitParity:
    def test_onnx_runtime_matches_pytorch_on_the_test_split(self, trained):
        """wff dev parity: every test patient through the checkpoints and the exported models agrees within
        the tolerance, with detections and clips actually compared."""
        from wff.training.parity import format_parity, split_parity

        data, artifacts = trained
        summary = split_parity(data, artifacts, "test")
        assert summary["patients"] == 4 and summary["passed"], format_parity(summary)
        assert summary["detector"]["detections"] > 0 and summary["classifier"]["clips"] > 0
        assert set(summary["strategies"]) == {"Det", "Det-Age", "Seq", "Seq-Age", "Det-Seq", "Det-Seq-Age"}

    def test_another_model_fails(self, trained, tmp_path):
        """An ONNX file that is not the checkpoint's export (fold 1's classifier in place of the final one)
        fails the comparison."""
        import shutil

        from wff.ensemble.pipeline import fold_models_dir
        from wff.training.checkpoint import load_classifier
        from wff.training.export import export_classifier
        from wff.training.parity import split_parity

        data, artifacts = trained
        copy = shutil.copytree(artifacts, tmp_path / "artifacts")
        fold_classifier, profile = load_classifier(fold_models_dir(artifacts, 0) / "classifier.pt")
        export_classifier(fold_classifier, profile, copy / "classifier.onnx")
        summary = split_parity(data, copy, "test")
        assert not summary["passed"]
        assert summary["classifier"]["probs"] > summary["tolerance"]["probability"]
