"""Static-shape detector graph (wff.training.detector_graph): outputs, NMS, agreement with torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, nms

from wff.training.detector_graph import DetectorGraph, cluster_nms, decode_boxes, pairwise_iou
from wff.training.models import build_detector

torch.set_num_threads(2)

# Sorted by score. A overlaps B (IoU 0.67), B overlaps C (IoU 0.67), A and C barely touch
# (IoU 0.11); D is far away. Greedy NMS at 0.5 keeps A, C, D; Fast NMS also drops C.
CHAIN = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],  # A
        [2.0, 0.0, 12.0, 10.0],  # B
        [4.0, 0.0, 14.0, 10.0],  # C
        [50.0, 50.0, 60.0, 60.0],  # D
    ]
)


def _upper(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


@pytest.fixture(scope="module")
def graph(tiny_profile):
    torch.manual_seed(0)
    return DetectorGraph(build_detector(tiny_profile).eval(), tiny_profile).eval()


class TestClusterNMS:
    def test_fast_nms_over_suppresses_a_chain(self):
        """One pass (Fast NMS): C is suppressed by B although B itself is suppressed."""
        keep = cluster_nms(CHAIN[None], torch.ones(1, 4, dtype=torch.bool), 0.5, _upper(4), iterations=1)
        assert keep[0].tolist() == [True, False, False, True]

    def test_cluster_nms_matches_greedy(self):
        """Three passes recover greedy NMS on the chain."""
        keep = cluster_nms(CHAIN[None], torch.ones(1, 4, dtype=torch.bool), 0.5, _upper(4))
        greedy = nms(CHAIN, torch.tensor([0.9, 0.8, 0.7, 0.6]), 0.5)
        assert torch.nonzero(keep[0]).flatten().tolist() == sorted(greedy.tolist()) == [0, 2, 3]

    def test_invalid_boxes_neither_kept_nor_suppress(self):
        """An invalid top box does not suppress the duplicate under it."""
        valid = torch.tensor([[False, True, True, True]])
        keep = cluster_nms(CHAIN[None], valid, 0.5, _upper(4))
        assert keep[0].tolist() == [False, True, False, True]

    def test_random_boxes_subset_of_greedy(self):
        """On random boxes the kept set never holds a box greedy NMS drops, and usually equals it."""
        g = torch.Generator().manual_seed(0)
        equal = 0
        for _ in range(20):
            xy = torch.rand(40, 2, generator=g) * 50
            boxes = torch.cat([xy, xy + 5 + torch.rand(40, 2, generator=g) * 20], 1)
            scores = torch.rand(40, generator=g).sort(descending=True).values
            keep = cluster_nms(boxes[None], torch.ones(1, 40, dtype=torch.bool), 0.5, _upper(40))[0]
            greedy = torch.zeros(40, dtype=torch.bool)
            greedy[nms(boxes, scores, 0.5)] = True
            assert not (keep & ~greedy).any()
            equal += bool(torch.equal(keep, greedy))
        assert equal >= 15

    def test_pairwise_iou_matches_torchvision(self):
        boxes = torch.rand(2, 6, 4) * 10
        boxes[..., 2:] += boxes[..., :2]
        for b in range(2):
            torch.testing.assert_close(pairwise_iou(boxes)[b], box_iou(boxes[b], boxes[b]))


class TestDecode:
    def test_matches_box_coder(self):
        """decode_boxes == torchvision BoxCoder.decode_single, including the dw/dh clamp."""
        coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 50.0, 30.0], [1.0, 2.0, 3.0, 4.0]])
        deltas = torch.tensor([[1.0, -2.0, 0.5, 0.3], [0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 50.0, -1.0]])
        torch.testing.assert_close(decode_boxes(deltas, anchors, (10.0, 10.0, 5.0, 5.0)), coder.decode_single(deltas, anchors))


class TestDetectorGraph:
    def test_output_contract(self, graph, tiny_profile):
        """Shapes (B, K, 4), (B, K), (B, K) int32, (B, K), (B, 1) int32 for B = 1 and 3."""
        k = tiny_profile.detector.top_k
        for b in (1, 3):
            with torch.no_grad():
                boxes, scores, labels, malignancy, count = graph(torch.rand(b, 1, 64, 64))
            assert boxes.shape == (b, k, 4) and boxes.dtype == torch.float32
            assert scores.shape == malignancy.shape == labels.shape == (b, k)
            assert labels.dtype == count.dtype == torch.int32 and count.shape == (b, 1)

    def test_padding_is_zero_and_valid_rows_come_first(self, graph):
        """Rows past count are all zero; valid rows have labels 1/2, scores > 0.05, descending, boxes in the image."""
        torch.manual_seed(1)
        with torch.no_grad():
            boxes, scores, labels, malignancy, count = graph(torch.rand(4, 1, 64, 64))
        for i in range(4):
            n = int(count[i, 0])
            assert (boxes[i, n:] == 0).all() and (scores[i, n:] == 0).all()
            assert (labels[i, n:] == 0).all() and (malignancy[i, n:] == 0).all()
            assert set(labels[i, :n].tolist()) <= {1, 2} and (scores[i, :n] > 0.05).all()
            assert torch.all(scores[i, :n].diff() <= 0)
            assert ((malignancy[i, :n] > 0.5) == (labels[i, :n] == 2)).all()
            assert (boxes[i, :n] >= 0).all() and (boxes[i, :n] <= 64).all()

    def test_score_floor_gives_empty_output(self, tiny_profile):
        """With every detection under the floor, count is 0 and everything is padding."""
        model = build_detector(tiny_profile).eval()
        graph = DetectorGraph(model, tiny_profile, score_floor=1.0).eval()
        with torch.no_grad():
            boxes, scores, labels, _, count = graph(torch.rand(2, 1, 64, 64))
        assert count.sum() == 0 and boxes.abs().sum() == 0 and labels.abs().sum() == 0

    def test_proposals_and_pooling_match_torchvision(self, tiny_profile):
        """RPN proposals are torchvision's and multi-level RoIAlign equals MultiScaleRoIAlign."""
        torch.manual_seed(0)
        detector = build_detector(tiny_profile).eval()
        graph = DetectorGraph(detector, tiny_profile).eval()
        x = torch.rand(2, 1, 64, 64)
        with torch.no_grad():
            features = detector.backbone(x)
            reference, _ = detector.rpn(ImageList(x, [(64, 64)] * 2), features)
            proposals, valid = graph._proposals(list(features.values()))
            for i in range(2):
                # Cluster-NMS keeps a subset of greedy NMS's boxes, so (nearly) every valid proposal is one of torchvision's.
                found = box_iou(proposals[i][valid[i]], reference[i]).max(1).values
                assert (found > 0.999).float().mean() >= 0.95 and int(valid[i].sum()) >= 0.95 * len(reference[i])
            pooled = graph._pool(list(features.values()), proposals)
            expected = detector.roi_heads.box_roi_pool(features, list(proposals), [(64, 64)] * 2)
        torch.testing.assert_close(pooled, expected)

    def test_shares_weights(self, tiny_profile):
        """The graph uses the detector's parameters, not copies."""
        model = build_detector(tiny_profile)
        graph = DetectorGraph(model, tiny_profile)
        assert graph.box_predictor.cls_score.weight is model.roi_heads.box_predictor.cls_score.weight

    def test_anchor_pass_leaves_batchnorm_stats(self, tiny_profile):
        """Building the graph runs a dummy pass without touching BatchNorm running stats."""
        model = build_detector(tiny_profile).train()
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        DetectorGraph(model, tiny_profile)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert model.training

