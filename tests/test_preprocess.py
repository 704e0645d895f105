"""Intensity window, letterbox and resampling matrices."""

import numpy as np
import pytest

from wff.config import ImageConfig
from wff.ensemble.preprocess import letterbox, normalize_intensity, prepare_patient
from wff.ensemble.resample import area_matrix, resample_matrix
from wff.ensemble.types import Series, Study


class TestResample:
    def test_area_rows_sum_to_one(self):
        """Area averaging preserves a constant image and mean intensity."""
        m = area_matrix(10, 4)
        np.testing.assert_allclose(m.sum(axis=1), 1.0)
        np.testing.assert_allclose(m @ np.arange(10.0), [0.8, 3.2, 5.8, 8.2], rtol=1e-6)

    def test_identity_when_size_kept(self):
        """Same size -> identity matrix."""
        np.testing.assert_allclose(resample_matrix(5, 5), np.eye(5), atol=1e-6)


class TestLetterbox:
    def test_aspect_kept_and_padded_bottom_right(self):
        """A 20x10 image into 40: scale 2, content 40x20 at the top-left, zeros elsewhere."""
        out, scale = letterbox(np.ones((1, 20, 10), np.float32), 40)
        assert scale == 2.0 and out.shape == (1, 40, 40)
        assert out[0, :40, :20].min() == pytest.approx(1.0) and out[0, :, 20:].max() == 0

    def test_shrink_averages(self):
        """Shrinking a checkerboard by 2 gives its mean, not aliasing."""
        board = (np.indices((8, 8)).sum(axis=0) % 2).astype(np.float32)[None]
        out, scale = letterbox(board, 4)
        assert scale == 0.5
        np.testing.assert_allclose(out, 0.5, atol=1e-6)


class TestNormalize:
    def test_percentile_window(self):
        """The clip percentiles map to 0 and 1, values outside are clipped."""
        px = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
        out = normalize_intensity(px, ImageConfig(clip_low=10, clip_high=90))
        assert out.min() == 0 and out.max() == 1 and out.dtype == np.float32

    def test_constant_series(self):
        """A constant series maps to zeros instead of dividing by zero."""
        assert not normalize_intensity(np.full((2, 3, 3), 7.0), ImageConfig()).any()


class TestPreparePatient:
    def test_series_after_series(self):
        """Slices of all series concatenate with their series index and info."""
        def series(n, seq):
            return Series(seq, f"{seq} SAG", 1, np.random.default_rng(0).random((n, 16, 12), dtype=np.float32), (1.0, 1.0), np.arange(n, dtype=float), tuple(map(str, range(n))))
        p = prepare_patient(Study((series(3, "T1"), series(2, "T2"))), ImageConfig(size=32))
        assert p.slices.shape == (5, 1, 32, 32)
        assert p.slice_series.tolist() == [0, 0, 0, 1, 1] and p.scales == (2.0, 2.0)
        assert p.series_info[1]["sequence"] == "T2" and p.series_info[0]["n_slices"] == 3
