"""The crop step: region choice, clip indices and crop geometry."""

import numpy as np
import pytest

from wff.config import ClassifierConfig
from wff.ensemble.crop import clip_indices, crop_clip, crop_patient, expand_box, largest_region


class TestClipIndices:
    def test_centred_window(self):
        """A long series gives N consecutive slices around the centre."""
        np.testing.assert_array_equal(clip_indices(20, 10, 4), [8, 9, 10, 11])

    def test_window_shifted_inside_series(self):
        """Near the ends the window shifts to stay inside the series."""
        np.testing.assert_array_equal(clip_indices(20, 0, 4), [0, 1, 2, 3])
        np.testing.assert_array_equal(clip_indices(20, 19, 4), [16, 17, 18, 19])

    def test_short_series_repeats_in_order(self):
        """A series shorter than N repeats slices in order."""
        np.testing.assert_array_equal(clip_indices(3, 1, 6), [0, 0, 1, 1, 2, 2])
        np.testing.assert_array_equal(clip_indices(1, 0, 4), [0, 0, 0, 0])

    def test_rejects_empty_series(self):
        """A series without slices is an error."""
        with pytest.raises(ValueError, match="at least one slice"):
            clip_indices(0, 0, 4)


class TestLargestRegion:
    def test_largest_confident_box(self):
        """The largest box above threshold wins, even if another scores higher."""
        boxes = np.array([[[0, 0, 10, 10], [0, 0, 1, 1]], [[0, 0, 20, 20], [0, 0, 0, 0]]], np.float32)
        scores = np.array([[0.99, 0.9], [0.6, 0.0]], np.float32)
        r = largest_region(boxes, scores, np.array([2, 1]), 0.5, 64)
        assert (r.centre, r.box, r.source) == (1, (0, 0, 20, 20), "detected")

    def test_low_score_fallback(self):
        """Below threshold everywhere: the best-scoring box is used."""
        boxes = np.array([[[0, 0, 10, 10]], [[5, 5, 30, 30]]], np.float32)
        r = largest_region(boxes, np.array([[0.2], [0.3]], np.float32), np.array([1, 1]), 0.5, 64)
        assert (r.centre, r.source) == (1, "low_score")

    def test_no_box_default_region(self):
        """No detections at all: a centred square on the middle slice."""
        r = largest_region(np.zeros((5, 2, 4), np.float32), np.zeros((5, 2), np.float32), np.zeros(5), 0.5, 64)
        assert (r.centre, r.box, r.source) == (2, (16, 16, 48, 48), "default")


class TestCropGeometry:
    def test_expand_box_clips_to_image(self):
        """A margin grows the box and the image border clips it."""
        assert expand_box((0, 10, 10, 20), 0.5, 100) == (0.0, 5.0, 15.0, 25.0)

    def test_crop_reproduces_linear_ramp(self):
        """Bilinear crop of a horizontal ramp samples the ramp at the output pixel centres."""
        ramp = np.tile(np.arange(64, dtype=np.float32), (64, 1))[None]  # (1, 64, 64) value = x
        clip = crop_clip(ramp, (16, 16, 32, 32), np.array([0]), 8)
        np.testing.assert_allclose(clip[0, 0], 16 + (np.arange(8) + 0.5) * 2 - 0.5, atol=1e-5)

    def test_crop_patient_shapes_and_series_order(self):
        """Two series -> two clips of (1, N, C, C), regions in series-local slice indices."""
        cfg = ClassifierConfig(clip_len=4, crop_size=8, crop_margin=0.0)
        slices = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
        series = np.array([0, 0, 0, 1, 1], np.int32)
        boxes = np.tile(np.array([4, 4, 12, 12], np.float32), (5, 1, 1))
        clips, rows, regions = crop_patient(slices, series, boxes, np.full((5, 1), 0.9, np.float32), np.ones((5, 1), np.int32), cfg, 0.5)
        assert clips.shape == (2, 1, 4, 8, 8) and rows.shape == (2, 5)
        assert [r.centre for r in regions] == [0, 0]
