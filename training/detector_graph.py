"""Static-shape inference graph of the trained Faster R-CNN, for export and serving.

``DetectorGraph`` shares the weights of a :func:`wff.training.models.build_detector` model
and reimplements its inference path with shapes fixed by the profile, so the ONNX graph has
only the batch dimension dynamic and no NonZero / Loop / If / NonMaxSuppression: TensorRT 10's
ONNX parser and ONNX Runtime take it as is.

Steps (S = image.size, R = rpn_post_nms_top_n, K = top_k):

1. backbone + FPN, RPN head;
2. per FPN level, the ``min(rpn_pre_nms_top_n, anchors of the level)`` best anchors (TopK with
   a constant k), decoded like torchvision's ``BoxCoder`` (weights 1, 1, 1, 1), clipped to
   the image, boxes under 1e-3 px marked invalid;
3. per-level NMS at ``rpn_nms_iou`` as Cluster-NMS (below), then the R best surviving
   proposals over all levels (TopK);
4. multi-level RoIAlign with torchvision's FPN level mapping (Eq. 1 of the FPN paper, k0 = 4,
   224 px): RoIAlign on every pooled level, then a one-hot level mask selects each RoI's level;
5. the trained box head and predictor; per proposal, score = 1 - P(background), label =
   the likelier tumour class, malignancy = P(malignant) / (P(benign) + P(malignant)), box =
   that class's regression (BoxCoder weights 10, 10, 5, 5), clipped;
6. detections with score <= ``SCORE_FLOOR`` or under 1e-2 px are dropped, the rest sorted,
   class-agnostic Cluster-NMS at ``box_nms_iou``, the K best kept, zero-padded.

Fast / Cluster-NMS (Bolya et al. 2019, Zheng et al. 2021) on boxes sorted by score: ``iou``
is the (N, N) IoU matrix masked to its strict upper triangle (row i may suppress column j
only when i scores higher); box j is kept when ``max_i keep_i * iou[i, j] <= threshold``.
One pass with every box allowed to suppress is Fast NMS; repeating the pass with only the
boxes kept by the previous one converges to greedy NMS. ``NMS_ITERATIONS`` is odd, so the kept
set is always a subset of greedy NMS's (never a duplicate greedy NMS would have removed);
chains deeper than that (A suppresses B, B would suppress C, ...) may lose a box greedy keeps.

Differences from torchvision's eager ``FasterRCNN.forward`` in eval mode (measured by
:func:`eager_agreement`):

* torchvision emits one detection per (proposal, tumour class) with score P(class) and runs
  NMS per class; here a proposal gives one detection, scored 1 - P(background), labelled by
  the larger tumour probability, with class-agnostic NMS. Scores are therefore >= the eager
  ones (P(benign) + P(malignant) >= either), and a region cannot be reported twice with both
  labels;
* NMS is Cluster-NMS with a fixed iteration count instead of greedy NMS (RPN and final);
* when fewer than R proposals survive the RPN NMS, the remaining slots hold suppressed
  proposals flagged invalid, whose detections are discarded (torchvision has fewer RoIs);
* the score floor is the same (0.05, strict), the output is always K rows, padded with zeros,
  with ``count`` giving the valid rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, roi_align

from wff.config import Profile
from wff.training.models import ROI_SAMPLING_RATIO, roi_featmap_names

SCORE_FLOOR = 0.05  # detections scoring at or below 1 - P(background) = 0.05 are not reported
NMS_ITERATIONS = 3  # Cluster-NMS passes; odd keeps the result a subset of greedy NMS
RPN_MIN_SIZE = 1e-3  # torchvision RegionProposalNetwork.min_size
BOX_MIN_SIZE = 1e-2  # torchvision RoIHeads.postprocess_detections remove_small_boxes
BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # torchvision BoxCoder clamp on dw, dh
CANONICAL_SCALE, CANONICAL_LEVEL = 224, 4  # FPN level mapping, Eq. 1 of Lin et al. 2017


def decode_boxes(deltas: Tensor, anchors: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """torchvision ``BoxCoder.decode_single`` on matching ``(..., 4)`` tensors.

    deltas (..., 4) = (dx, dy, dw, dh) scaled by ``weights``; anchors (..., 4) x1 y1 x2 y2.
    Returns boxes (..., 4) x1 y1 x2 y2.
    """
    wx, wy, ww, wh = weights
    widths = anchors[..., 2] - anchors[..., 0]
    heights = anchors[..., 3] - anchors[..., 1]
    ctr_x = anchors[..., 0] + 0.5 * widths
    ctr_y = anchors[..., 1] + 0.5 * heights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = torch.clamp(deltas[..., 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(deltas[..., 3] / wh, max=BBOX_XFORM_CLIP)
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = 0.5 * torch.exp(dw) * widths, 0.5 * torch.exp(dh) * heights
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def pairwise_iou(boxes: Tensor) -> Tensor:
    """boxes (B, N, 4) x1 y1 x2 y2 -> IoU (B, N, N) float; 0 where the union is empty.

    The coordinates are split first, so every (B, N, N) intermediate is built once from (B, N)
    columns: no (B, N, N, 2) corner tensors to slice afterwards (in the exported graph those
    slices were Gathers over the whole matrix, a sixth of the served detector's time).
    """
    x1, y1, x2, y2 = boxes.unbind(dim=2)  # (B, N) each
    area = (x2 - x1) * (y2 - y1)
    iw = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    ih = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = iw * ih  # (B, N, N)
    union = area[:, :, None] + area[:, None, :] - inter
    return inter / union.clamp(min=1e-9)


def cluster_nms(boxes: Tensor, valid: Tensor, iou_threshold: float, upper: Tensor, iterations: int = NMS_ITERATIONS) -> Tensor:
    """Fixed-shape NMS over boxes already sorted by descending score.

    boxes (B, N, 4), valid (B, N) bool (invalid boxes neither survive nor suppress),
    upper (N, N) bool, True strictly above the diagonal. Returns keep (B, N) bool.
    ``iterations=1`` is Fast NMS; see the module docstring.
    """
    iou = torch.where(upper, pairwise_iou(boxes), 0.0)  # (B, N, N): row i (higher score) may suppress column j
    keep = valid
    for _ in range(iterations):
        strongest = (iou * keep.unsqueeze(2).to(iou.dtype)).amax(dim=1)  # (B, N)
        keep = valid & (strongest <= iou_threshold)
    return keep


def _upper(n: int) -> Tensor:
    """(n, n) bool, True strictly above the diagonal: a constant of the graph (no Trilu op)."""
    return torch.ones(n, n, dtype=torch.bool).triu(diagonal=1)


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, k) int64 -> (B, k, D) rows of each image."""
    # repeat (ONNX Tile with constant repeats), not expand: keeps every dim but B static in the graph
    return torch.gather(x, 1, idx.unsqueeze(2).repeat(1, 1, x.shape[2]))


class DetectorGraph(nn.Module):
    """Static-shape inference of a trained :func:`build_detector` model (shared weights).

    forward: images ``(B, 1, S, S)`` float32 in [0, 1] (the contract's ``detector_image``) ->

    * boxes ``(B, K, 4)`` float32, x1 y1 x2 y2 in input pixels, in descending score order;
    * scores ``(B, K)`` float32, 1 - P(background) of the box, 0 for padding;
    * labels ``(B, K)`` int32, 1 benign / 2 malignant (``config.DETECTOR_CLASSES``), 0 padding;
    * malignancy ``(B, K)`` float32, P(malignant) / (P(benign) + P(malignant)), 0 padding;
    * count ``(B, 1)`` int32, valid rows (the first ``count`` rows; the rest is zeros).

    Call ``.eval()`` before use (BatchNorm). ``S`` and ``K`` come from the profile the
    detector was built with; the anchors are computed here once for that input size.
    """

    def __init__(self, detector: FasterRCNN, profile: Profile, score_floor: float = SCORE_FLOOR) -> None:
        super().__init__()
        d = profile.detector
        self.size = profile.image.size
        self.top_k = d.top_k
        self.post_nms = d.rpn_post_nms_top_n
        if self.top_k > self.post_nms:
            raise ValueError(f"detector.top_k ({self.top_k}) cannot exceed rpn_post_nms_top_n ({self.post_nms})")
        self.rpn_nms_iou, self.box_nms_iou, self.score_floor = d.rpn_nms_iou, d.box_nms_iou, score_floor
        self.backbone = detector.backbone
        self.rpn_head = detector.rpn.head
        self.box_head = detector.roi_heads.box_head
        self.box_predictor = detector.roi_heads.box_predictor
        self.rpn_weights = tuple(float(w) for w in detector.rpn.box_coder.weights)
        self.box_weights = tuple(float(w) for w in detector.roi_heads.box_coder.weights)
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, -1, 1, 1), persistent=False)

        anchors, shapes = self._static_anchors(detector)
        self.level_shapes = shapes  # per level (A, H, W)
        self.level_k = [min(d.rpn_pre_nms_top_n, a * h * w) for a, h, w in shapes]
        for level, a in enumerate(anchors):
            self.register_buffer(f"anchors_{level}", a, persistent=False)  # (A*H*W, 4), (H, W, A) order
            self.register_buffer(f"upper_{level}", _upper(self.level_k[level]), persistent=False)
        self.register_buffer("upper_rois", _upper(self.post_nms), persistent=False)

        self.roi_levels = len(roi_featmap_names(profile))
        self.roi_scales = [2.0 ** round(math.log2(h / self.size)) for _, h, _ in shapes[: self.roi_levels]]
        self.k_min = int(round(-math.log2(self.roi_scales[0])))
        self.k_max = int(round(-math.log2(self.roi_scales[-1])))
        self.roi_output = d.roi_output_size

    @torch.no_grad()
    def _static_anchors(self, detector: FasterRCNN) -> tuple[list[Tensor], list[tuple[int, int, int]]]:
        """Anchors of every level for an S x S input, from one dummy pass (BatchNorm stats untouched)."""
        param = next(detector.parameters())
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            x = torch.zeros(1, 1, self.size, self.size, device=param.device, dtype=param.dtype)
            feats = list(self.backbone(x).values())
        finally:
            self.backbone.train(was_training)
        generator = detector.rpn.anchor_generator
        all_anchors = generator(ImageList(x, [(self.size, self.size)]), feats)[0]  # (sum A*H*W, 4)
        per_level = generator.num_anchors_per_location()
        shapes = [(a, f.shape[-2], f.shape[-1]) for a, f in zip(per_level, feats)]
        anchors = list(all_anchors.split([a * h * w for a, h, w in shapes]))
        return [a.contiguous() for a in anchors], shapes

    def _proposals(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RPN -> proposals (B, R, 4) in descending objectness, valid (B, R) bool."""
        objectness, deltas = self.rpn_head(features)
        scores, boxes = [], []
        for level, (obj, reg) in enumerate(zip(objectness, deltas)):
            a, h, w = self.level_shapes[level]
            n, k = a * h * w, self.level_k[level]
            obj = obj.permute(0, 2, 3, 1).reshape(-1, n)  # (B, H*W*A), anchor order (H, W, A)
            reg = reg.reshape(-1, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, n, 4)  # (B, H*W*A, 4)
            top, idx = obj.topk(k, dim=1)  # (B, k), sorted descending
            anchors = getattr(self, f"anchors_{level}").index_select(0, idx.reshape(-1)).reshape(-1, k, 4)  # (B, k, 4)
            box = decode_boxes(_take(reg, idx), anchors, self.rpn_weights).clamp(0, self.size)
            valid = ((box[..., 2] - box[..., 0]) >= RPN_MIN_SIZE) & ((box[..., 3] - box[..., 1]) >= RPN_MIN_SIZE)
            keep = cluster_nms(box, valid, self.rpn_nms_iou, getattr(self, f"upper_{level}"))
            scores.append(torch.where(keep, torch.sigmoid(top), -1.0))
            boxes.append(box)
        score = torch.cat(scores, dim=1)  # (B, P)
        top, idx = score.topk(self.post_nms, dim=1)  # (B, R)
        return _take(torch.cat(boxes, dim=1), idx), top >= 0

    def _pool(self, features: list[Tensor], proposals: Tensor) -> Tensor:
        """Multi-level RoIAlign: proposals (B, R, 4) -> (B*R, C, r, r), torchvision level mapping."""
        r = self.post_nms
        batch = torch.arange(proposals.shape[0], device=proposals.device, dtype=proposals.dtype)
        batch = batch.view(-1, 1, 1).repeat(1, r, 1)  # (B, R, 1)
        rois = torch.cat((batch, proposals), dim=2).reshape(-1, 5)  # (B*R, 5): image index, x1 y1 x2 y2
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        level = torch.floor(CANONICAL_LEVEL + torch.log2(torch.sqrt(area) / CANONICAL_SCALE) + 1e-6)
        level = level.clamp(self.k_min, self.k_max) - self.k_min  # (B*R,)
        pooled = None
        for i in range(self.roi_levels):
            out = roi_align(
                features[i], rois, self.roi_output, spatial_scale=self.roi_scales[i], sampling_ratio=ROI_SAMPLING_RATIO, aligned=False
            )  # (B*R, C, r, r)
            mask = (level == i).to(out.dtype).view(-1, 1, 1, 1)
            pooled = out * mask if pooled is None else pooled + out * mask
        return pooled

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x = (images - self.mean) / self.std
        features = list(self.backbone(x).values())
        proposals, proposal_valid = self._proposals(features)  # (B, R, 4), (B, R)
        r = self.post_nms

        class_logits, box_regression = self.box_predictor(self.box_head(self._pool(features, proposals)))
        probs = torch.softmax(class_logits, dim=1).reshape(-1, r, 3)  # (B, R, classes)
        p_benign, p_malignant = probs[..., 1], probs[..., 2]
        score = p_benign + p_malignant  # = 1 - P(background), without the cancellation
        malignant = p_malignant > p_benign  # (B, R)
        malignancy = p_malignant / score.clamp(min=1e-12)
        regression = box_regression.reshape(-1, r, 3, 4)  # (B, R, classes, 4)
        deltas = torch.where(malignant.unsqueeze(2), regression[:, :, 2], regression[:, :, 1])  # (B, R, 4)
        boxes = decode_boxes(deltas, proposals, self.box_weights).clamp(0, self.size)

        big = ((boxes[..., 2] - boxes[..., 0]) >= BOX_MIN_SIZE) & ((boxes[..., 3] - boxes[..., 1]) >= BOX_MIN_SIZE)
        valid = proposal_valid & big & (score > self.score_floor)
        ranked, order = torch.where(valid, score, -1.0).topk(r, dim=1)  # (B, R)
        # Per-detection values travel together through the two gathers: (B, R, 7).
        packed = torch.cat((boxes, score.unsqueeze(2), malignancy.unsqueeze(2), malignant.to(boxes.dtype).unsqueeze(2)), dim=2)
        packed = _take(packed, order)
        keep = cluster_nms(packed[..., :4], ranked >= 0, self.box_nms_iou, self.upper_rois)
        top, idx = torch.where(keep, ranked, -1.0).topk(self.top_k, dim=1)  # (B, K)
        packed = _take(packed, idx)
        found = top >= 0  # (B, K)
        packed = packed * found.unsqueeze(2).to(packed.dtype)
        labels = found.to(torch.int32) + packed[..., 6].to(torch.int32)  # 0 padding, 1 benign, 2 malignant
        count = found.to(packed.dtype).sum(dim=1, keepdim=True).to(torch.int32)  # (B, 1)
        return packed[..., :4], packed[..., 4], labels, packed[..., 5], count


@torch.no_grad()
def eager_agreement(detector: FasterRCNN, graph: DetectorGraph, images: Tensor) -> dict[str, float]:
    """Compare DetectorGraph with torchvision's eager postprocess on ``images`` (B, 1, S, S).

    Per image where both report a box: IoU of the two top-scoring boxes, and the score gap
    (graph score = 1 - P(background) vs eager P(top class)); plus how often only one of them
    finds anything, and the mean number of boxes each reports. Both models are put in eval.
    """
    detector.eval()
    graph.eval()
    eager = detector(list(images))
    boxes, scores, labels, _, count = graph(images)
    ious, gaps, same_label, only_one = [], [], [], 0
    for i, e in enumerate(eager):
        n = int(count[i, 0])
        if n == 0 or len(e["boxes"]) == 0:
            only_one += int((n == 0) != (len(e["boxes"]) == 0))
            continue
        ious.append(float(box_iou(boxes[i, :1], e["boxes"][:1])[0, 0]))
        gaps.append(float(scores[i, 0] - e["scores"][0]))
        same_label.append(float(int(labels[i, 0]) == int(e["labels"][0])))
    mean = lambda v: float(sum(v) / len(v)) if v else float("nan")  # noqa: E731
    return {
        "images": float(len(eager)),
        "both_found": float(len(ious)),
        "only_one_found": float(only_one),
        "top_box_iou_mean": mean(ious),
        "top_box_iou_min": min(ious) if ious else float("nan"),
        "top_score_gap_mean": mean(gaps),
        "top_label_agreement": mean(same_label),
        "graph_boxes_mean": float(count.float().mean()),
        "eager_boxes_mean": mean([float(len(e["boxes"])) for e in eager]),
    }


__all__ = ["DetectorGraph", "cluster_nms", "pairwise_iou", "decode_boxes", "eager_agreement", "SCORE_FLOOR", "NMS_ITERATIONS"]
