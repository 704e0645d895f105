"""Intensity window, letterbox and patient preparation (wff.ensemble.preprocess)."""

import numpy as np
import pytest

from wff.config import ImageConfig
from wff.ensemble.preprocess import letterbox, normalize_intensity, prepare_patient
from wff.ensemble.types import Series, Study

INFO_KEYS = {"index", "sequence", "sequence_source", "description", "series_number", "n_slices", "rows", "cols", "pixel_spacing"}


def series(n, sequence, rows=16, cols=12, number=1, seed=0):
    pixels = np.random.default_rng(seed).random((n, rows, cols), dtype=np.float32) * 1000
    return Series(sequence, f"{sequence} SAG", number, pixels, (0.9, 0.9), np.arange(n, dtype=float), tuple(f"f{i}" for i in range(n)),
                  f"SeriesDescription '{sequence} SAG'")


class TestNormalize:
    def test_percentile_window(self):
        """The clip percentiles map to 0 and 1 and values outside are clipped."""
        px = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
        out = normalize_intensity(px, ImageConfig(clip_low=10, clip_high=90))
        assert out.dtype == np.float32 and out.shape == px.shape
        assert out.min() == 0 and out.max() == 1
        assert out[5, 0, 0] == pytest.approx((500 - 99.9) / (899.1 - 99.9), abs=1e-5)  # value 500 inside the window

    def test_window_is_per_series_not_per_slice(self):
        """A dim slice stays dimmer than a bright one of the same series."""
        px = np.stack([np.full((4, 4), 100.0), np.full((4, 4), 200.0), np.linspace(0, 300, 16).reshape(4, 4)])
        out = normalize_intensity(px, ImageConfig(clip_low=0, clip_high=100))
        assert out[0].mean() < out[1].mean()

    def test_integer_input(self):
        """uint16 modality values come back as float32 in [0, 1]."""
        out = normalize_intensity(np.arange(64, dtype=np.uint16).reshape(1, 8, 8), ImageConfig())
        assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1

    def test_constant_series(self):
        """A constant series maps to zeros instead of dividing by zero."""
        assert not normalize_intensity(np.full((2, 3, 3), 7.0), ImageConfig()).any()

    def test_empty_series(self):
        """An empty stack is refused with its shape."""
        with pytest.raises(ValueError, match="empty series"):
            normalize_intensity(np.zeros((0, 4, 4)), ImageConfig())


class TestLetterbox:
    def test_aspect_kept_and_padded_bottom_right(self):
        """A 20x10 image into 40: scale 2, content 40x20 at the top-left, zeros elsewhere."""
        out, scale = letterbox(np.ones((1, 20, 10), np.float32), 40)
        assert scale == 2.0 and out.shape == (1, 40, 40) and out.dtype == np.float32
        assert out[0, :40, :20].min() == pytest.approx(1.0) and out[0, :, 20:].max() == 0

    def test_shrink_averages(self):
        """Shrinking a checkerboard by 2 gives its mean, not aliasing."""
        board = (np.indices((8, 8)).sum(axis=0) % 2).astype(np.float32)[None]
        out, scale = letterbox(board, 4)
        assert scale == 0.5
        np.testing.assert_allclose(out, 0.5, atol=1e-6)

    def test_non_square_shrink(self):
        """256 rows x 224 columns into 128: scale 0.5, 112 content columns, zero padding after."""
        out, scale = letterbox(np.ones((2, 256, 224), np.float32), 128)
        assert scale == 0.5 and out.shape == (2, 128, 128)
        assert out[:, :, :112].min() == pytest.approx(1.0) and out[:, :, 112:].max() == 0

    def test_box_maps_by_scale(self):
        """A bright block at source pixels [60, 100) x [40, 80) lands at those edges times the scale."""
        px = np.zeros((1, 320, 256), np.float32)
        px[0, 40:80, 60:100] = 1
        out, scale = letterbox(px, 256)
        ys, xs = np.nonzero(out[0] > 0.5)
        assert scale == 0.8
        assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (48, 80, 32, 64)

    def test_rejects_2d(self):
        """A single 2D image is not a stack."""
        with pytest.raises(ValueError, match=r"\(n, rows, cols\)"):
            letterbox(np.ones((8, 8), np.float32), 4)


class TestPreparePatient:
    def test_series_after_series(self):
        """Slices of all series concatenate in series order with their index, scale and info."""
        study = Study((series(3, "T1"), series(2, "T2", rows=8, cols=32, number=2)))
        p = prepare_patient(study, ImageConfig(size=32))
        assert p.slices.shape == (5, 1, 32, 32) and p.slices.dtype == np.float32
        assert p.slice_series.tolist() == [0, 0, 0, 1, 1] and p.slice_series.dtype == np.int32
        assert p.scales == (2.0, 1.0)
        assert 0 <= p.slices.min() and p.slices.max() <= 1

    def test_series_info_contract(self):
        """series_info has exactly the documented keys and no identifiers."""
        p = prepare_patient(Study((series(3, "STIR", number=7),)), ImageConfig(size=16))
        (info,) = p.series_info
        assert set(info) == INFO_KEYS
        assert info == {"index": 0, "sequence": "STIR", "sequence_source": "SeriesDescription 'STIR SAG'", "description": "STIR SAG", "series_number": 7,
                        "n_slices": 3, "rows": 16, "cols": 12, "pixel_spacing": [0.9, 0.9]}

    def test_empty_study(self):
        """A study without series cannot be prepared."""
        with pytest.raises(ValueError, match="no selected series"):
            prepare_patient(Study(()), ImageConfig())
