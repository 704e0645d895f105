"""Resampling matrices shared by the letterbox and the crop step (wff.ensemble.resample)."""

import numpy as np
import pytest

from wff.ensemble.crop import crop_clip
from wff.ensemble.resample import area_matrix, bilinear_matrix, resample_matrix, resize_stack


def reference_bilinear(start, stop, out, size):
    """The crop step's original private sampler, kept here to pin its behaviour."""
    centres = np.clip(start + (np.arange(out) + 0.5) * (stop - start) / out - 0.5, 0, size - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    frac = centres - lo
    m = np.zeros((out, size))
    for i in range(out):
        m[i, lo[i]] += 1 - frac[i]
        m[i, hi[i]] += frac[i]
    return m


def centroid(image):
    """Intensity centroid (x, y) in pixel-edge coordinates."""
    ys, xs = np.indices(image.shape)
    total = image.sum()
    return (image * (xs + 0.5)).sum() / total, (image * (ys + 0.5)).sum() / total


class TestBilinear:
    @pytest.mark.parametrize("start,stop,out,size", [(0, 10, 10, 10), (2.5, 7.25, 16, 10), (0, 40, 7, 40), (-3, 50, 12, 48)])
    def test_matches_original_crop_sampler(self, start, stop, out, size):
        """The shared matrix is the crop step's former private one, value for value."""
        np.testing.assert_allclose(bilinear_matrix(start, stop, out, size), reference_bilinear(start, stop, out, size), atol=1e-6)

    def test_crop_uses_it(self):
        """crop_clip of a linear ramp samples it at the box's pixel centres."""
        ramp = np.tile(np.arange(32, dtype=np.float32), (2, 32, 1))  # (2, 32, 32), value = x
        clip = crop_clip(ramp, (8.0, 0.0, 16.0, 32.0), np.array([0, 1]), 8)
        np.testing.assert_allclose(clip[0, 0], np.arange(8) + 8.0, atol=1e-5)

    def test_identity_when_size_kept(self):
        """Same span and size -> identity."""
        np.testing.assert_allclose(resample_matrix(5, 5), np.eye(5), atol=1e-6)


class TestArea:
    def test_rows_average_the_covered_interval(self):
        """10 -> 4: each output pixel is the mean of 2.5 source pixels."""
        m = area_matrix(10, 4)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(m @ np.arange(10.0), [0.8, 3.2, 5.8, 8.2], rtol=1e-6)

    def test_explicit_scale_clips_the_last_pixel(self):
        """7 pixels at scale 0.5 round up to 4 outputs; the last one covers only source pixel 6."""
        m = area_matrix(7, 4, scale=0.5)
        np.testing.assert_allclose(m[-1], np.eye(7)[6], atol=1e-6)
        np.testing.assert_allclose(m[0], [0.5, 0.5, 0, 0, 0, 0, 0], atol=1e-6)

    def test_refuses_enlarging(self):
        """Area averaging only shrinks."""
        with pytest.raises(ValueError, match="scale must be in"):
            area_matrix(4, 8)


class TestResizeStack:
    @pytest.mark.parametrize("scale", [0.5, 0.37, 1.0, 1.6, 2.0])
    def test_points_map_to_x_times_scale(self, scale):
        """A blob's centroid moves from (x, y) to (x * scale, y * scale) on both axes."""
        image = np.zeros((1, 40, 30), np.float32)
        image[0, 10:16, 20:24] = 1.0
        cx, cy = centroid(image[0])
        rows, cols = round(40 * scale), round(30 * scale)
        out = resize_stack(image, rows, cols, scale)
        ox, oy = centroid(out[0])
        assert out.shape == (1, rows, cols) and out.dtype == np.float32
        assert ox == pytest.approx(cx * scale, abs=0.3) and oy == pytest.approx(cy * scale, abs=0.3)

    def test_constant_stays_constant(self):
        """Rows of both matrices sum to one, shrinking or enlarging."""
        for scale in (0.3, 2.5):
            out = resize_stack(np.full((2, 17, 23), 3.0), round(17 * scale), round(23 * scale), scale)
            np.testing.assert_allclose(out, 3.0, rtol=1e-5)

    def test_unchanged_size_skips_the_products_with_identical_values(self):
        rng = np.random.default_rng(3)
        stack = rng.integers(0, 4096, (3, 20, 20)).astype(np.float32) * np.float32(1.7)
        ry, rx = resample_matrix(20, 20, 1.0), resample_matrix(20, 20, 1.0)
        products = np.matmul(np.matmul(ry, stack), rx.T)
        out = resize_stack(stack, 20, 20, 1.0)
        assert out.dtype == np.float32 and out.shape == stack.shape
        np.testing.assert_array_equal(out, products)  # the identity matrices change nothing, bit for bit
        assert resize_stack(stack, 19, 20, 1.0).shape == (3, 19, 20)  # a cropped output still resamples

