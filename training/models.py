"""The two networks of the WFF, built from a profile with random weights (training/pretrained.py
loads ``detector.weights`` / ``classifier.weights`` into them when set).

* Detector (paper, "Detection model"): a tri-class Faster R-CNN (torchvision) over a
  feature pyramid. Class ids follow ``config.DETECTOR_CLASSES``: 0 background, 1 benign,
  2 malignant. Backbones:

  - ``"resnet_small"`` (CPU default): a light ResNet of BasicBlocks
    (16-32-64-128 channels, strides 4..32) under a torchvision FeaturePyramidNetwork.
  - ``"resnext101_dcn"``: the paper's ResNeXt101-32x8d with a one-channel stem and DCNv1
    deformable 3x3 convolutions (Dai et al. 2017) in stages conv3..conv5, under an FPN over
    five scales 1/4 .. 1/64 (P6 is subsampled from P5, as in the FPN paper).

  The detector transform never resizes: inputs arrive letterboxed to ``image.size`` and
  normalised to [0, 1] by the preprocess step, so ``image_mean=[0]``, ``image_std=[1]`` and
  ``min_size = max_size = image.size``.

* Sequence classifier (paper, "Sequence classification model"): a 3D ResNeXt (Hara et al.
  2018 layout: bottlenecks with grouped 3x3x3 convolutions, expansion 2) on clips
  ``(B, 1, N, C, C)``, returning softmax probabilities ``(B, 2) = (P benign, P malignant)``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import DeformConv2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from wff.config import DETECTOR_CLASSES, LABELS, Profile

DETECTOR_BACKBONES = ("resnet_small", "resnext101_dcn")
CLASSIFIER_ARCHS = ("resnext3d_small", "resnext3d_101")
SIZE_DIVISIBLE = 32  # the detector input size must be a multiple of the coarsest backbone stride
ROI_MAX_LEVELS = 4  # RoIs pool from P2..P5; P6 feeds the RPN only (FPN paper, Sec. 4.2)
ROI_SAMPLING_RATIO = 2  # RoIAlign samples per bin side (torchvision's Faster R-CNN default)


# --------------------------------------------------------------------------- detector


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity/projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """Light grayscale ResNet for CPU: (B, 1, H, W) -> layer1..layer4 at strides 4, 8, 16, 32.

    Children are registered in execution order so torchvision's IntermediateLayerGetter can
    cut it after the last stage the FPN needs.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128), blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        in_ch = channels[0]
        for i, ch in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers = [_BasicBlock(in_ch, ch, stride)] + [_BasicBlock(ch, ch, 1) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            in_ch = ch
        self.out_channels_list = list(channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


class DeformableConv2d(nn.Module):
    """DCNv1 (Dai et al. 2017): a 3x3 conv sampling at learned offsets.

    A plain conv predicts 2 offsets (dy, dx) per kernel tap and output pixel; it starts at
    zero, so an untrained layer is exactly the regular convolution it replaces.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        kh, kw = conv.kernel_size
        self.offset = nn.Conv2d(conv.in_channels, 2 * kh * kw, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, self.offset(x))


def _resnext101_dcn(dcn_stages: tuple[str, ...] = ("layer2", "layer3", "layer4")) -> tuple[nn.Module, list[int]]:
    """torchvision ResNeXt101-32x8d, random init, 1-channel stem, DCN in ``dcn_stages``."""
    net = torchvision.models.resnext101_32x8d(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    for stage in dcn_stages:
        for block in getattr(net, stage):
            block.conv2 = DeformableConv2d(block.conv2)
    del net.avgpool, net.fc  # IntermediateLayerGetter stops before them anyway
    return net, [256, 512, 1024, 2048]


class _NoExtraLevel(ExtraFPNBlock):
    """FPN without extra levels (torchvision's default would add a P6)."""

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        return results, names


def _backbone(profile: Profile) -> BackboneWithFPN:
    d = profile.detector
    if d.backbone == "resnet_small":
        body = SmallResNet()
        channels = body.out_channels_list
    elif d.backbone == "resnext101_dcn":
        body, channels = _resnext101_dcn()
    else:
        raise ValueError(f"unknown detector backbone {d.backbone!r}; expected one of {DETECTOR_BACKBONES}")
    if not 1 <= d.fpn_levels <= 5:
        raise ValueError(f"detector.fpn_levels must be 1..5 (strides 4..64), got {d.fpn_levels}")
    stages = min(d.fpn_levels, 4)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(i) for i in range(stages)},
        in_channels_list=channels[:stages],
        out_channels=d.fpn_channels,
        # P6 = P5 subsampled by 2 (LastLevelMaxPool) when a fifth level is asked for.
        extra_blocks=LastLevelMaxPool() if d.fpn_levels == 5 else _NoExtraLevel(),
    )


def roi_featmap_names(profile: Profile) -> list[str]:
    """FPN levels the RoI head pools from: P2..P5 at most (P6 is RPN-only)."""
    return [str(i) for i in range(min(profile.detector.fpn_levels, ROI_MAX_LEVELS))]


def build_detector(profile: Profile) -> FasterRCNN:
    """Tri-class Faster R-CNN for ``profile`` (random init).

    Input: a list of ``(1, S, S)`` float32 images in [0, 1], ``S = profile.image.size``.
    Training targets: ``boxes`` (FloatTensor[m, 4], x1 y1 x2 y2 in input pixels) and
    ``labels`` (Int64Tensor[m], 1 benign / 2 malignant; 0 is background).
    For export use :class:`wff.training.detector_graph.DetectorGraph`, which shares these
    weights and has static shapes.
    """
    d, size = profile.detector, profile.image.size
    if size % SIZE_DIVISIBLE:
        raise ValueError(f"image.size must be a multiple of {SIZE_DIVISIBLE} (no resize, no padding), got {size}")
    if len(d.anchor_sizes) != d.fpn_levels:
        raise ValueError(f"detector.anchor_sizes needs one size per FPN level ({d.fpn_levels}), got {d.anchor_sizes}")
    if d.top_k > d.rpn_post_nms_top_n:
        raise ValueError(f"detector.top_k ({d.top_k}) cannot exceed rpn_post_nms_top_n ({d.rpn_post_nms_top_n})")
    backbone = _backbone(profile)
    anchors = AnchorGenerator(sizes=tuple((s,) for s in d.anchor_sizes), aspect_ratios=(tuple(d.aspect_ratios),) * d.fpn_levels)
    roi_pool = MultiScaleRoIAlign(roi_featmap_names(profile), d.roi_output_size, ROI_SAMPLING_RATIO)
    box_head = TwoMLPHead(d.fpn_channels * d.roi_output_size**2, d.representation_size)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=size,
        max_size=size,
        image_mean=[0.0],
        image_std=[1.0],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=d.rpn_pre_nms_top_n,
        rpn_pre_nms_top_n_test=d.rpn_pre_nms_top_n,
        # Twice the proposals in training gives the RoI head more negatives to learn from.
        rpn_post_nms_top_n_train=2 * d.rpn_post_nms_top_n,
        rpn_post_nms_top_n_test=d.rpn_post_nms_top_n,
        rpn_nms_thresh=d.rpn_nms_iou,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(d.representation_size, len(DETECTOR_CLASSES)),
        box_score_thresh=0.05,
        box_nms_thresh=d.box_nms_iou,
        box_detections_per_img=d.top_k,
        box_batch_size_per_image=128,
    )


# --------------------------------------------------------------------------- classifier


class _Bottleneck3d(nn.Module):
    """ResNeXt bottleneck: 1x1x1 -> grouped 3x3x3 (stride) -> 1x1x1, expansion 2."""

    expansion = 2

    def __init__(self, in_ch: int, planes: int, cardinality: int, stride: int) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv3d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm3d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ResNeXt3d(nn.Module):
    """3D ResNeXt sequence classifier.

    forward: clip ``(B, 1, N, C, C)`` float32 in [0, 1] -> ``(B, 2)`` float32 softmax
    probabilities ordered as ``config.LABELS`` (P benign, P malignant).
    :meth:`logits` returns the pre-softmax ``(B, 2)`` scores for training.

    Stage i has ``2 * width * 2**i`` bottleneck channels (grouped ``cardinality`` ways) and
    twice that at its output; ``width=64, cardinality=32, layers=(3, 4, 23, 3)`` is the
    ResNeXt-101 (32x4d-style) of Hara et al. used by the paper.
    """

    def __init__(self, width: int, cardinality: int, layers: tuple[int, ...], stem_depth: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(1, width, (stem_depth, 7, 7), (1, 2, 2), (stem_depth // 2, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, 2, 1),
        )
        stages, in_ch = [], width
        for i, n_blocks in enumerate(layers):
            planes = 2 * width * 2**i
            if planes % cardinality:
                raise ValueError(f"stage {i} has {planes} channels, not divisible by cardinality {cardinality}")
            blocks = []
            for j in range(n_blocks):
                blocks.append(_Bottleneck3d(in_ch, planes, cardinality, 2 if (j == 0 and i > 0) else 1))
                in_ch = planes * _Bottleneck3d.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(in_ch, len(LABELS))
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: blocks start as identity
            if isinstance(m, _Bottleneck3d):
                nn.init.zeros_(m.bn3.weight)

    def logits(self, clip: Tensor) -> Tensor:
        x = self.stages(self.stem(clip))  # (B, F, n, h, w)
        return self.fc(self.pool(x).flatten(1))  # (B, 2)

    def forward(self, clip: Tensor) -> Tensor:
        return torch.softmax(self.logits(clip), dim=1)


def build_classifier(profile: Profile) -> ResNeXt3d:
    """3D ResNeXt for ``profile.classifier`` (random init); see :class:`ResNeXt3d`.

    ``arch`` picks the stem: ``"resnext3d_101"`` uses Hara et al.'s 7x7x7 stem, the CPU
    ``"resnext3d_small"`` a 3x7x7 one (about half the stem cost). Depth, width and
    cardinality always come from the config fields.
    """
    c = profile.classifier
    if c.arch not in CLASSIFIER_ARCHS:
        raise ValueError(f"unknown classifier arch {c.arch!r}; expected one of {CLASSIFIER_ARCHS}")
    if not c.layers or min(c.layers) < 1:
        raise ValueError(f"classifier.layers needs at least one block per stage, got {c.layers}")
    return ResNeXt3d(c.width, c.cardinality, tuple(c.layers), stem_depth=7 if c.arch == "resnext3d_101" else 3)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DETECTOR_BACKBONES",
    "CLASSIFIER_ARCHS",
    "SmallResNet",
    "DeformableConv2d",
    "ResNeXt3d",
    "build_detector",
    "build_classifier",
    "roi_featmap_names",
    "count_parameters",
]
