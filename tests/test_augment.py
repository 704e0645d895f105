"""MultiScale-SelfCutMix geometry (wff.training.augment)."""

from __future__ import annotations

import pytest
import torch

from wff.training.augment import MAX_JITTER, MAX_OVERLAP, MAX_SHIFT, MIN_SHIFT, self_cutmix

SIZE = 64
SCALE = (0.5, 1.0)
TUMOUR = (28.0, 24.0, 40.0, 34.0)  # x1, y1, x2, y2: 12 x 10 px, mid-height of a 64 px slice


def _slice() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.zeros(1, SIZE, SIZE)
    x1, y1, x2, y2 = (int(v) for v in TUMOUR)
    image[:, y1:y2, x1:x2] = 1.0
    return image, torch.tensor([TUMOUR]), torch.tensor([2])


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    lt, rb = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
    inter = float((rb - lt).clamp(min=0).prod())
    area = lambda t: float((t[2] - t[0]) * (t[3] - t[1]))  # noqa: E731
    return inter / (area(a) + area(b) - inter)


class TestSelfCutMix:
    @pytest.mark.parametrize("seed", range(8))
    def test_pasted_box_geometry(self, seed):
        """The new box keeps the label, is 0.5-1x the source, sits along the spine column inside the image."""
        image, boxes, labels = _slice()
        out, new_boxes, new_labels = self_cutmix(image, boxes, labels, torch.Generator().manual_seed(seed), 1.0, SCALE)
        if len(new_boxes) == 1:  # no placement found: unchanged
            assert torch.equal(out, image)
            return
        assert new_labels.tolist() == [2, 2]
        src, new = new_boxes[0], new_boxes[1]
        sw, sh = float(src[2] - src[0]), float(src[3] - src[1])
        nw, nh = float(new[2] - new[0]), float(new[3] - new[1])
        assert SCALE[0] * sw - 1 <= nw <= SCALE[1] * sw + 1e-4
        assert SCALE[0] * sh - 1 <= nh <= SCALE[1] * sh + 1e-4
        assert float(new.min()) >= 0 and float(new[2]) <= SIZE and float(new[3]) <= SIZE
        dy = abs(float(new[1] + new[3] - src[1] - src[3]) / 2)
        dx = abs(float(new[0] + new[2] - src[0] - src[2]) / 2)
        assert MIN_SHIFT * sh - 1 <= dy <= MAX_SHIFT * sh + 1
        assert dx <= MAX_JITTER * sw + 1
        assert _iou(src, new) <= MAX_OVERLAP

    def test_pasted_pixels_are_the_tumour(self):
        """Inside the new box the pixels are the (rescaled) bright tumour; outside nothing else changed."""
        image, boxes, labels = _slice()
        out, new_boxes, _ = self_cutmix(image, boxes, labels, torch.Generator().manual_seed(3), 1.0, SCALE)
        assert len(new_boxes) == 2
        x1, y1, x2, y2 = (round(float(v)) for v in new_boxes[1])
        assert float(out[0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].mean()) > 0.9
        changed = (out != image)[0]
        changed[y1 - 1 : y2 + 1, x1 - 1 : x2 + 1] = False
        assert not changed.any()

    def test_same_seed_same_result(self):
        """A generator seed fixes the augmentation."""
        image, boxes, labels = _slice()
        a = self_cutmix(image, boxes, labels, torch.Generator().manual_seed(7), 1.0, SCALE)
        b = self_cutmix(image, boxes, labels, torch.Generator().manual_seed(7), 1.0, SCALE)
        assert all(torch.equal(x, y) for x, y in zip(a, b))

    def test_probability_zero_is_identity(self):
        """cutmix_prob 0 returns the inputs."""
        image, boxes, labels = _slice()
        out = self_cutmix(image, boxes, labels, torch.Generator().manual_seed(0), 0.0, SCALE)
        assert out[0] is image and out[1] is boxes and out[2] is labels

    def test_slice_without_boxes_is_unchanged(self):
        """Negative slices have nothing to copy."""
        image = torch.rand(1, SIZE, SIZE)
        out, boxes, labels = self_cutmix(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.Generator(), 1.0, SCALE)
        assert out is image and boxes.shape == (0, 4) and labels.shape == (0,)

    def test_no_room_leaves_slice_unchanged(self):
        """A tumour spanning the content height cannot move along the column: nothing is pasted."""
        image = torch.zeros(1, SIZE, SIZE)
        boxes = torch.tensor([[20.0, 2.0, 40.0, 62.0]])
        out, new_boxes, _ = self_cutmix(image, boxes, torch.tensor([1]), torch.Generator().manual_seed(0), 1.0, SCALE)
        assert out is image and len(new_boxes) == 1

    def test_stays_inside_content_bounds(self):
        """With a letterbox, the paste stays in the top-left content region."""
        image, boxes, labels = _slice()
        for seed in range(10):
            _, new_boxes, _ = self_cutmix(image, boxes, labels, torch.Generator().manual_seed(seed), 1.0, SCALE, bounds=(48, 50))
            assert float(new_boxes[:, 3].max()) <= 48 and float(new_boxes[:, 2].max()) <= 50
