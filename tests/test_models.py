"""Detector and classifier construction, training loops and checkpoints (wff.training.models / engine / checkpoint).

Synthetic patients: two series of six 64 px slices each; the four middle slices of every
series carry one bright rectangle (the tumour) on a vertical "spine" band, brighter and
taller for malignant patients.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wff.config import PAPER, SMALL
from wff.ensemble.crop import clip_indices, crop_clip, expand_box
from wff.ensemble.types import AnnotatedPatient, PatientRecord, PreparedPatient
from wff.training.detector_graph import DetectorGraph, eager_agreement
from wff.training.engine import (
    balanced_draws,
    DetectorSample,
    detector_epoch,
    choose_centre,
    fit_classifier,
    fit_detector,
    series_tracks,
    train_one_epoch,
    training_clip,
)
from wff.training.checkpoint import load_classifier, load_detector, save_checkpoint
from wff.training.models import DeformableConv2d, build_classifier, build_detector

torch.set_num_threads(2)

SIZE = 64
SERIES, SLICES = 2, 6


def fake_patients(n: int, size: int = SIZE, seed: int = 0) -> list[AnnotatedPatient]:
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(n):
        label = i % 2
        slices = (0.1 * rng.random((SERIES * SLICES, 1, size, size))).astype(np.float32)
        mid = size // 2
        slices[:, 0, :, mid - size // 16 : mid + size // 16] += 0.3
        boxes = []
        for s in range(SERIES * SLICES):
            if not 1 <= s % SLICES <= SLICES - 2:
                boxes.append(np.zeros((0, 4), np.float32))
                continue
            w, h = 0.18 * size, (0.22 if label else 0.14) * size
            x1, y1 = mid - w / 2 + rng.uniform(-2, 2), rng.uniform(0.1, 0.8 - h / size) * size
            slices[s, 0, int(y1) : int(y1 + h), int(x1) : int(x1 + w)] = 0.9 if label else 0.6
            boxes.append(np.array([[x1, y1, x1 + w, y1 + h]], np.float32))
        info = tuple({"index": q, "sequence": "T2", "rows": size, "cols": size} for q in range(SERIES))
        prepared = PreparedPatient(np.clip(slices, 0, 1), np.repeat(np.arange(SERIES, dtype=np.int32), SLICES), (1.0,) * SERIES, info)
        patients.append(AnnotatedPatient(PatientRecord(f"p{i}", label, 50.0, ("lumbar",), "train", Path(".")), prepared, tuple(boxes)))
    return patients


@pytest.fixture(scope="module")
def profile(tiny_profile):
    return tiny_profile.replace(detector={"batch_size": 4}, classifier={"batch_size": 4, "clips_per_series": 2})


@pytest.fixture(scope="module")
def patients():
    return fake_patients(4)


@pytest.fixture(scope="module")
def trained_detector(profile, patients):
    losses = []
    model = fit_detector(patients, profile, epochs=5, progress=lambda step, total, d: losses.append(sum(d.values())))
    return model, losses


class TestBuild:
    def test_small_detector_trains_and_predicts(self, profile):
        """The small Faster R-CNN returns the four losses in train mode and at most top_k boxes in eval."""
        model = build_detector(profile)
        images = [torch.rand(1, SIZE, SIZE), torch.rand(1, SIZE, SIZE)]
        targets = [
            {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        ]
        losses = model.train()(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        with torch.no_grad():
            out = model.eval()(images)
        assert len(out[0]["boxes"]) <= profile.detector.top_k
        assert model.roi_heads.box_predictor.cls_score.out_features == 3

    def test_classifier_returns_probabilities(self, profile):
        """(B, 1, N, C, C) -> (B, 2) rows summing to one; logits() gives the pre-softmax scores."""
        c = profile.classifier
        model = build_classifier(profile).eval()
        clip = torch.rand(3, 1, c.clip_len, c.crop_size, c.crop_size)
        with torch.no_grad():
            probs, logits = model(clip), model.logits(clip)
        assert probs.shape == (3, 2)
        torch.testing.assert_close(probs.sum(1), torch.ones(3))
        torch.testing.assert_close(probs, torch.softmax(logits, 1))

    def test_paper_models_run(self):
        """Paper profile: ResNeXt101-32x8d + DCN + 5-level FPN and the 3D ResNeXt-101 build and run one tiny forward."""
        paper = PAPER.replace(image={"size": 64}, classifier={"clip_len": 4, "crop_size": 16})
        detector = build_detector(paper).eval()
        assert sum(isinstance(m, DeformableConv2d) for m in detector.modules()) == 4 + 23 + 3  # conv3..conv5 blocks
        graph = DetectorGraph(detector, paper).eval()
        with torch.no_grad():
            boxes, scores, labels, malignancy, count = graph(torch.rand(1, 1, 64, 64))
        assert boxes.shape == (1, paper.detector.top_k, 4) and len(graph.level_shapes) == 5
        classifier = build_classifier(paper).eval()
        assert len(classifier.stages[2]) == 23
        with torch.no_grad():
            assert classifier(torch.rand(1, 1, 4, 16, 16)).shape == (1, 2)

    @pytest.mark.parametrize(
        "section, change, match",
        [
            ("detector", {"backbone": "vgg"}, "unknown detector backbone"),
            ("detector", {"anchor_sizes": (16, 32)}, "one size per FPN level"),
            ("image", {"size": 100}, "multiple of 32"),
            ("detector", {"top_k": 64}, "cannot exceed"),
        ],
    )
    def test_detector_config_errors(self, section, change, match):
        """Bad detector settings fail with a message naming the allowed values."""
        with pytest.raises(ValueError, match=match):
            build_detector(SMALL.replace(**{section: change}))

    def test_classifier_config_errors(self):
        """An unknown arch or a cardinality that does not divide the width is rejected."""
        with pytest.raises(ValueError, match="unknown classifier arch"):
            build_classifier(SMALL.replace(classifier={"arch": "c3d"}))
        with pytest.raises(ValueError, match="cardinality"):
            build_classifier(SMALL.replace(classifier={"cardinality": 3}))


class TestFitDetector:
    def test_loss_decreases(self, trained_detector):
        """Five epochs on the synthetic tumours: finite losses, last steps well below the first."""
        _, losses = trained_detector
        assert all(math.isfinite(v) for v in losses)
        assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])

    def test_graph_agrees_with_eager_on_trained_model(self, trained_detector, profile, patients):
        """DetectorGraph's top box matches torchvision's eager top box on a trained model (IoU > 0.9)."""
        model, _ = trained_detector
        graph = DetectorGraph(model, profile).eval()
        stats = eager_agreement(model, graph, torch.from_numpy(patients[1].prepared.slices))
        assert stats["both_found"] >= 4
        assert stats["top_box_iou_mean"] > 0.9
        assert stats["top_score_gap_mean"] >= -1e-6  # 1 - P(bg) >= P(class)

    def test_no_boxes_is_an_error(self, profile, patients):
        """A training set without labelled boxes cannot train a detector."""
        empty = [AnnotatedPatient(p.record, p.prepared, ()) for p in patients]
        with pytest.raises(ValueError, match="no labelled tumour boxes"):
            fit_detector(empty, profile, epochs=1)

    def test_non_finite_loss_stops_training(self):
        """A NaN loss raises FloatingPointError naming the step and the loss terms."""
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

        def loss_fn(m, batch):
            return {"loss_x": m(batch).sum() * float("nan")}

        with pytest.raises(FloatingPointError, match=r"step 1/1: \{'loss_x': nan\}"):
            train_one_epoch(model, opt, sched, [torch.ones(1, 2)], loss_fn, 0, 1, None, "test")


class TestFitClassifier:
    def test_trains_with_finite_decreasing_loss(self, profile, patients):
        """A few epochs of class-balanced clips: finite losses, lower at the end than at the start."""
        losses = []
        model = fit_classifier(patients, profile, epochs=15, progress=lambda step, total, d: losses.append(d["loss_classifier"]))
        assert not model.training and len(losses) == 15 * 4  # 8 series x 2 clips / batch 4 per epoch
        assert all(math.isfinite(v) for v in losses)
        assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])

    def test_training_clip_uses_the_crop_step(self, profile, patients):
        """Without augmentation a training clip is exactly the crop step's clip of the largest labelled box."""
        p = profile.replace(classifier={"random_slice_prob": 1.0})
        track = series_tracks(patients)[0]
        patient = patients[track.patient]
        rng = np.random.default_rng(0)
        clip = training_clip(patient, track, p, rng, augment=False)
        centre = choose_centre(len(track.members), track.labelled, p.classifier.clip_len, 1.0, np.random.default_rng(0))
        box = expand_box(track.box, p.classifier.crop_margin, p.image.size)
        expected = crop_clip(patient.prepared.slices[track.members, 0], box, clip_indices(len(track.members), centre, p.classifier.clip_len), p.classifier.crop_size)
        np.testing.assert_array_equal(clip, expected)
        areas = [(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in patient.boxes[: len(track.members)] if len(b)]
        assert (track.box[2] - track.box[0]) * (track.box[3] - track.box[1]) == pytest.approx(float(np.max(np.concatenate(areas))))

    def test_dicom_index_window_overlaps_labelled_range(self):
        """Centres chosen "by DICOM index" give windows that overlap the labelled slices, at varied positions."""
        rng = np.random.default_rng(0)
        labelled, n, length = np.array([10, 11, 12]), 30, 4
        starts = set()
        for _ in range(200):
            idx = clip_indices(n, choose_centre(n, labelled, length, 0.0, rng), length)
            assert idx.max() >= labelled.min() and idx.min() <= labelled.max()
            starts.add(int(idx[0]))
        assert starts == set(range(7, 13))

    def test_random_slice_centres_on_a_labelled_slice(self):
        rng = np.random.default_rng(0)
        labelled = np.array([3, 8])
        assert {choose_centre(20, labelled, 4, 1.0, rng) for _ in range(50)} == {3, 8}

    def test_detector_epoch_balances_tumour_slices(self):
        """Balanced: as many benign as malignant tumour slices in expectation, same epoch length, plus the negatives."""
        positives = [DetectorSample(i, 0) for i in range(40)]
        labels = np.array([0] * 10 + [1] * 30)
        negatives = [DetectorSample(100 + i, 0) for i in range(20)]
        rng = np.random.default_rng(0)
        benign = []
        for _ in range(200):
            epoch = detector_epoch(positives, labels, negatives, 5, True, rng)
            assert len(epoch) == 45 and sum(s.patient >= 100 for s in epoch) == 5
            benign.append(sum(s.patient < 10 for s in epoch) / 40)
        assert np.mean(benign) == pytest.approx(0.5, abs=0.02)
        plain = detector_epoch(positives, labels, negatives, 5, False, rng)
        assert sorted(s.patient for s in plain if s.patient < 100) == list(range(40))  # every tumour slice once

    def test_balanced_draws(self):
        """One malignant among nine benign series is drawn about half the time."""
        draws = balanced_draws(np.array([0] * 9 + [1]), 4000, np.random.default_rng(0))
        assert 0.45 < np.mean(draws == 9) < 0.55


class TestCheckpoint:
    def test_round_trip(self, tmp_path, trained_detector, profile):
        """Saved weights and profile come back; the reloaded models give the same outputs."""
        model, _ = trained_detector
        save_checkpoint(tmp_path / "detector.pt", model, profile, "detector", {"epochs": 5})
        loaded, loaded_profile = load_detector(tmp_path / "detector.pt")
        assert loaded_profile == profile
        x = torch.rand(2, 1, SIZE, SIZE)
        with torch.no_grad():
            for a, b in zip(DetectorGraph(model, profile).eval()(x), DetectorGraph(loaded, profile).eval()(x)):
                torch.testing.assert_close(a, b)
        classifier = build_classifier(profile).eval()
        save_checkpoint(tmp_path / "classifier.pt", classifier, profile, "classifier")
        reloaded, _ = load_classifier(tmp_path / "classifier.pt")
        clip = torch.rand(1, 1, profile.classifier.clip_len, profile.classifier.crop_size, profile.classifier.crop_size)
        with torch.no_grad():
            torch.testing.assert_close(classifier(clip), reloaded(clip))

    def test_wrong_kind(self, tmp_path, profile):
        """Loading a classifier checkpoint as a detector names both kinds."""
        save_checkpoint(tmp_path / "c.pt", build_classifier(profile), profile, "classifier")
        with pytest.raises(ValueError, match="holds a 'classifier' model, expected a 'detector'"):
            load_detector(tmp_path / "c.pt")
