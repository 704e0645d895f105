"""Several trained models of one step served as one: the cross-validation fold models.

Cross-validation chooses the fusion weights and thresholds on the outputs of the k fold models
(each scored on the quarter it did not see). ``serving.members = "folds"`` serves exactly those
k models side by side instead of the one final model refitted on the whole training set, and
merges their outputs into the step's contract, so the crop and fusion steps run unchanged:

* classifier: P(benign), P(malignant) of a clip averaged over the members;
* detector: the members' detections of a slice fused box by box (weighted box fusion). Taken
  in score order, a box joins the first cluster whose fused box it overlaps with IoU >= the
  threshold and that holds no box of its member yet, else it opens a cluster. A cluster's box
  is the score-weighted mean of its boxes, its malignancy the score-weighted mean of theirs,
  its score the sum of their scores over the number of members (a box that only one of four
  members finds keeps a quarter of its score), and its label malignant where the malignancy is
  at least 0.5. The K best clusters by score fill the contract's K detections.

With one member both merges return that member's outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]
MEMBERS = ("final", "folds")  # serving.members: the final model alone, or the cross-validation fold models


def check_members(members: str) -> None:
    if members not in MEMBERS:
        raise ValueError(f"serving.members: unknown value {members!r}; expected one of {MEMBERS}")


def check_box_iou(iou_threshold: float) -> None:
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"serving.members_box_iou must be in (0, 1], got {iou_threshold}")


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with each of (n, 4) boxes."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _fuse_slice(boxes, scores, malignancy, member, n_members: int, iou_threshold: float, k: int):
    """One slice's detections of all members (flat arrays) -> up to k fused (box, score, malignancy)."""
    clusters: list[dict] = []
    for i in np.argsort(-scores, kind="stable"):
        w = float(scores[i]) + 1e-9  # weight; a zero score still places its box
        target = None
        if clusters:
            ious = _iou(boxes[i], np.array([c["box"] for c in clusters]))
            for c in np.argsort(-ious, kind="stable"):
                if ious[c] < iou_threshold:
                    break
                if member[i] not in clusters[c]["members"]:
                    target = clusters[c]
                    break
        if target is None:
            target = {"box_sum": np.zeros(4), "weight": 0.0, "score": 0.0, "mal_sum": 0.0, "members": set()}
            clusters.append(target)
        target["box_sum"] = target["box_sum"] + w * boxes[i].astype(np.float64)
        target["weight"] += w
        target["score"] += float(scores[i])
        target["mal_sum"] += w * float(malignancy[i])
        target["members"].add(int(member[i]))
        target["box"] = target["box_sum"] / target["weight"]
    fused = [(c["box"], c["score"] / n_members, c["mal_sum"] / c["weight"]) for c in clusters]
    fused.sort(key=lambda t: -t[1])
    return fused[:k]


def merge_detections(outputs: Sequence[Arrays], iou_threshold: float) -> dict[str, np.ndarray]:
    """The detector outputs of several members on the same batch -> one detector output (module docstring)."""
    if len(outputs) == 1:
        return dict(outputs[0])
    check_box_iou(iou_threshold)
    first = outputs[0]
    n, k = first["detector_scores"].shape
    boxes = np.zeros((n, k, 4), np.float32)
    scores = np.zeros((n, k), np.float32)
    labels = np.zeros((n, k), np.int32)
    malignancy = np.zeros((n, k), np.float32)
    count = np.zeros((n, 1), np.int32)
    for b in range(n):
        parts = []
        for m, o in enumerate(outputs):
            c = int(np.asarray(o["detector_count"][b]).reshape(-1)[0])
            parts.append((o["detector_boxes"][b, :c], o["detector_scores"][b, :c], o["detector_malignancy"][b, :c], np.full(c, m)))
        flat = [np.concatenate(p) for p in zip(*parts)]
        if flat[1].size == 0:
            continue
        for j, (box, score, mal) in enumerate(_fuse_slice(*flat, len(outputs), iou_threshold, k)):
            boxes[b, j], scores[b, j], malignancy[b, j] = box, score, mal
            labels[b, j] = 2 if mal >= 0.5 else 1
            count[b, 0] = j + 1
    return {
        "detector_boxes": boxes,
        "detector_scores": scores,
        "detector_labels": labels,
        "detector_malignancy": malignancy,
        "detector_count": count.reshape(np.asarray(first["detector_count"]).shape),
    }


def mean_probabilities(outputs: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """The classifier outputs of several members -> their mean P(benign), P(malignant) per clip."""
    if len(outputs) == 1:
        return dict(outputs[0])
    return {"classifier_probs": np.mean([o["classifier_probs"] for o in outputs], axis=0).astype(np.float32)}


def merger(step: str, iou_threshold: float) -> Callable[[Sequence[Arrays]], dict[str, np.ndarray]]:
    """The merge of ``step``'s member outputs ("detector" or "classifier")."""
    if step == "detector":
        check_box_iou(iou_threshold)  # when the step loads, not at its first request
        return lambda outputs: merge_detections(outputs, iou_threshold)
    if step == "classifier":
        return mean_probabilities
    raise ValueError(f"no member merge for step {step!r}; only detector and classifier have trained members")
