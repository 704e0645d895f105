"""Training loops of the detector and the sequence classifier (torchvision references' engine).

``fit_detector`` and ``fit_classifier`` take annotated patients (wff.ensemble.types) and a
profile, build the sampler, model, optimiser and schedule, and run :func:`train_one_epoch`
per epoch. Training stops with :class:`FloatingPointError` on a non-finite loss.

Detector samples: every slice with at least one labelled box (label = patient label + 1,
since class 0 is background), plus ``detector.negatives_per_positive`` times as many slices
without boxes, redrawn each epoch. With ``detector.balanced_classes`` the tumour slices of an
epoch are drawn class-balanced (as many benign as malignant in expectation, same epoch length),
so the detector's P(malignant) is not tilted towards the training set's majority class.
MultiScale-SelfCutMix (wff.training.augment) on the
positives. SGD with momentum, linear warm-up then cosine decay.

Classifier samples (paper, "Sequence classification model"): per series, the largest labelled
box (detector pixels) across the series is the region, cropped from N slices with
wff.ensemble.crop (``expand_box`` with ``crop_margin``, ``crop_clip``), the functions the crop
step serves with. ``classifier.clip_rule`` chooses the N slices:

* ``"labelled"`` (the paper's rule, :func:`labelled_clip_indices`): the clip is made of the
  series' labelled slices only. With probability ``random_slice_prob`` N of them are drawn at
  random (kept in DICOM order); otherwise N consecutive entries of the labelled list, in DICOM
  order, from a random start. A series with fewer than N labelled slices repeats them.
* ``"window"``: N consecutive slices of the series, labelled or not (``clip_indices``), as the
  crop step builds its clips at test time. The centre slice is, with probability
  ``random_slice_prob``, a random labelled slice; otherwise "by DICOM index": the window's
  position is drawn uniformly over all positions that still overlap the labelled slice range.

Series are drawn with class-balanced rates (each class equally often; the paper's "different
sample rates"), ``clips_per_series`` draws per series per epoch. Light augmentation: box
jitter, intensity gamma and scale. AdamW, linear warm-up then cosine decay.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN

from wff.config import ClassifierConfig, Profile
from wff.ensemble.crop import clip_indices, crop_clip, expand_box
from wff.ensemble.types import AnnotatedPatient
from wff.training.augment import self_cutmix
from wff.training.checkpoint import load_classifier, load_detector, save_checkpoint
from wff.training.models import ResNeXt3d, build_classifier, build_detector
from wff.training.pretrained import init_pretrained

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, float]], None]  # (step, total steps, losses)

MOMENTUM = 0.9
WARMUP_FRACTION = 0.1  # of all steps, at most WARMUP_MAX_STEPS
WARMUP_MAX_STEPS = 200
FINAL_LR_FACTOR = 0.05  # cosine decays to this fraction of the base lr
GRAD_CLIP = 10.0  # max global grad norm (training from scratch; keeps early steps sane)
MIN_BOX_PX = 1.0  # labelled boxes thinner than this are dropped (torchvision rejects empty boxes)
BOX_JITTER = 0.1  # classifier region: each side moves by up to this fraction of the box size
GAMMA_RANGE = (0.8, 1.25)  # classifier intensity gamma, log-uniform
INTENSITY_SCALE = (0.9, 1.1)  # classifier intensity scale, uniform


# --------------------------------------------------------------------------- shared loop


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up from 10 % to 100 %, then cosine to FINAL_LR_FACTOR, for step 0..total-1."""
    warmup = max(1, min(WARMUP_MAX_STEPS, int(total * WARMUP_FRACTION)))
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * t))


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], dict[str, Tensor]],
    step: int,
    total: int,
    progress: Progress | None,
    what: str,
) -> int:
    """One pass over ``batches`` (stopping early once ``step`` reaches ``total``); returns the global step reached.

    ``loss_fn(model, batch)`` returns named losses, summed for the update. A non-finite sum
    raises FloatingPointError naming the step and every loss term.
    """
    model.train()
    every = max(1, total // 10)
    for batch in batches:
        if step >= total:
            break
        losses = loss_fn(model, batch)
        loss = sum(losses.values())
        values = {k: float(v.detach()) for k, v in losses.items()}
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(
                f"{what} loss is not finite at step {step + 1}/{total}: {values}; lower the learning rate or check the labels"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        step += 1
        if progress is not None:
            progress(step, total, values)
        elif step % every == 0 or step == total:
            log.info("%s step %d/%d loss %.4f %s", what, step, total, sum(values.values()), values)
    return step


def capped_steps(total: int, profile: Profile) -> int:
    """``total`` optimiser steps, or ``train.max_steps`` when that is set and smaller."""
    cap = profile.train.max_steps
    return min(total, cap) if cap > 0 else total


def _batched(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _rng_devices(device: str) -> list[int]:
    d = torch.device(device)
    return [d.index or 0] if d.type == "cuda" else []


# --------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class DetectorSample:
    patient: int  # index into the patients sequence
    slice: int  # global slice index in the patient's PreparedPatient


def _slice_boxes(patient: AnnotatedPatient, i: int) -> np.ndarray:
    """(m, 4) float32 boxes of slice i that are at least MIN_BOX_PX wide and high."""
    if not patient.boxes:
        return np.zeros((0, 4), np.float32)
    b = np.asarray(patient.boxes[i], np.float32).reshape(-1, 4)
    return b[((b[:, 2] - b[:, 0]) >= MIN_BOX_PX) & ((b[:, 3] - b[:, 1]) >= MIN_BOX_PX)]


def _check_boxes(patient: AnnotatedPatient) -> None:
    n = len(patient.prepared.slices)
    if patient.boxes and len(patient.boxes) != n:
        raise ValueError(f"patient {patient.record.patient_id}: {len(patient.boxes)} box lists for {n} slices")


def detector_samples(patients: Sequence[AnnotatedPatient]) -> tuple[list[DetectorSample], list[DetectorSample]]:
    """(positives, negatives): slices with and without usable labelled boxes."""
    pos, neg = [], []
    for p_idx, p in enumerate(patients):
        _check_boxes(p)
        for s in range(len(p.prepared.slices)):
            (pos if len(_slice_boxes(p, s)) else neg).append(DetectorSample(p_idx, s))
    return pos, neg


def detector_epoch(
    positives: Sequence[DetectorSample],
    positive_labels: np.ndarray,
    negatives: Sequence[DetectorSample],
    n_neg: int,
    balanced: bool,
    rng: np.random.Generator,
) -> list[DetectorSample]:
    """One epoch's shuffled samples: ``len(positives)`` tumour slices (every one, or drawn
    class-balanced by ``positive_labels`` when ``balanced``) and ``n_neg`` distinct negatives."""
    chosen = [negatives[i] for i in rng.choice(len(negatives), n_neg, replace=False)] if n_neg else []
    drawn = [positives[i] for i in balanced_draws(positive_labels, len(positives), rng)] if balanced else list(positives)
    order = drawn + chosen
    return [order[i] for i in rng.permutation(len(order))]


def _content_bounds(patient: AnnotatedPatient, s: int, size: int) -> tuple[int, int]:
    """(height, width) of the letterboxed image content of slice s (top-left anchored)."""
    prep = patient.prepared
    q = int(prep.slice_series[s])
    info = prep.series_info[q] if q < len(prep.series_info) else {}
    scale = prep.scales[q] if q < len(prep.scales) else 1.0
    rows, cols = info.get("rows"), info.get("cols")
    if rows is None or cols is None:
        return size, size
    return min(size, round(rows * scale)), min(size, round(cols * scale))


def fit_detector(
    patients: Sequence[AnnotatedPatient],
    profile: Profile,
    epochs: int,
    device: str = "cpu",
    progress: Progress | None = None,
    seed: int = 0,
) -> FasterRCNN:
    """Train :func:`build_detector` (from scratch, or from ``detector.weights``); returns it in eval mode on ``device``.

    Images are the patients' prepared slices (1, S, S) float32 in [0, 1]; boxes are their
    labelled rectangles in detector pixels, labelled 1 benign / 2 malignant by the patient's
    pathology. ``progress(step, total, losses)`` is called after every step (else INFO logs
    every 10 %). The caller's torch RNG state is left untouched; ``seed`` fixes init and data order.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    d = profile.detector
    positives, negatives = detector_samples(patients)
    if not positives:
        raise ValueError("no labelled tumour boxes in the training patients; the detector needs some")
    n_neg = min(len(negatives), round(d.negatives_per_positive * len(positives)))
    steps_per_epoch = math.ceil((len(positives) + n_neg) / d.batch_size)
    total = capped_steps(epochs * steps_per_epoch, profile)
    positive_labels = np.array([patients[s.patient].record.label for s in positives])
    rng = np.random.default_rng(seed)

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = build_detector(profile)
        init_pretrained(model, "detector", profile)  # detector.weights, when set
        model = model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=d.lr, momentum=MOMENTUM, weight_decay=d.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total))

        def loss_fn(m: nn.Module, batch: Sequence[DetectorSample]) -> dict[str, Tensor]:
            images, targets = [], []
            for sample in batch:
                p = patients[sample.patient]
                image = torch.from_numpy(np.ascontiguousarray(p.prepared.slices[sample.slice], np.float32))  # (1, S, S)
                boxes = torch.from_numpy(_slice_boxes(p, sample.slice))
                labels = torch.full((len(boxes),), p.record.label + 1, dtype=torch.int64)
                bounds = _content_bounds(p, sample.slice, profile.image.size)
                image, boxes, labels = self_cutmix(image, boxes, labels, gen, d.cutmix_prob, d.cutmix_scale, bounds)
                images.append(image.to(device))
                targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
            return m(images, targets)

        step = 0
        for _ in range(epochs):
            order = detector_epoch(positives, positive_labels, negatives, n_neg, d.balanced_classes, rng)
            step = train_one_epoch(model, optimizer, scheduler, _batched(order, d.batch_size), loss_fn, step, total, progress, "detector")
    return model.eval()


# --------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class SeriesTrack:
    """One series usable for classifier training."""

    patient: int  # index into the patients sequence
    members: np.ndarray  # (n,) global slice indices of the series, in series (DICOM) order
    labelled: np.ndarray  # (t,) series-local indices of slices with a labelled box, ascending
    box: tuple[float, float, float, float]  # largest labelled box of the series, detector pixels
    label: int  # 0 benign, 1 malignant


def series_tracks(patients: Sequence[AnnotatedPatient]) -> list[SeriesTrack]:
    """Every series with at least one labelled box; the region is its largest box by area."""
    tracks = []
    for p_idx, p in enumerate(patients):
        _check_boxes(p)
        series = np.asarray(p.prepared.slice_series)
        for q in np.unique(series):
            members = np.flatnonzero(series == q)
            best, best_area, labelled = None, -1.0, []
            for local, s in enumerate(members):
                boxes = _slice_boxes(p, s)
                if len(boxes) == 0:
                    continue
                labelled.append(local)
                area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                if area.max() > best_area:
                    best_area, best = float(area.max()), boxes[int(area.argmax())]
            if best is not None:
                box = tuple(float(v) for v in best)
                tracks.append(SeriesTrack(p_idx, members, np.asarray(labelled), box, int(p.record.label)))
    return tracks


def choose_centre(n_slices: int, labelled: np.ndarray, clip_len: int, random_slice_prob: float, rng: np.random.Generator) -> int:
    """Series-local centre slice of a training clip (see the module docstring).

    With probability ``random_slice_prob`` a random labelled slice; otherwise "by DICOM
    index": a window start drawn uniformly among the starts whose ``clip_len`` window
    overlaps [first labelled, last labelled], returned as the centre that
    ``clip_indices`` maps back to that start.
    """
    if rng.random() < random_slice_prob:
        return int(rng.choice(labelled))
    if n_slices <= clip_len:
        return n_slices // 2  # the clip covers the whole series whatever the centre
    lo, hi = int(labelled.min()), int(labelled.max())
    start = int(rng.integers(max(0, lo - clip_len + 1), min(hi, n_slices - clip_len) + 1))
    return start + clip_len // 2


def labelled_clip_indices(labelled: np.ndarray, clip_len: int, at_random: bool, rng: np.random.Generator) -> np.ndarray:
    """Series-local slice indices of a clip built from the labelled slices only, in DICOM order.

    ``labelled`` holds the series-local indices of the labelled slices, ascending. ``at_random``:
    ``clip_len`` of them drawn at random without repetition; with fewer than ``clip_len`` labelled,
    every labelled slice once and the rest drawn at random with repetition. Otherwise "by DICOM
    index": ``clip_len`` consecutive entries of ``labelled`` from a random start; with fewer than
    ``clip_len`` labelled, all of them repeated in order as ``clip_indices`` repeats a short
    series (labelled 2, 5 and N = 4 give 2, 2, 5, 5). The result is sorted either way.
    """
    labelled = np.asarray(labelled, np.int64)
    t = labelled.size
    if t < 1:
        raise ValueError("a labelled clip needs at least one labelled slice in the series")
    if clip_len < 1:
        raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    if at_random:
        if t >= clip_len:
            picks = rng.choice(t, size=clip_len, replace=False)
        else:
            picks = np.concatenate([np.arange(t), rng.choice(t, size=clip_len - t, replace=True)])
        return labelled[np.sort(picks)]
    if t >= clip_len:
        start = int(rng.integers(0, t - clip_len + 1))
        return labelled[start : start + clip_len]
    return labelled[clip_indices(t, 0, clip_len)]


def clip_slices(track: SeriesTrack, cfg: ClassifierConfig, rng: np.random.Generator) -> np.ndarray:
    """Series-local slice indices of one training clip of ``track`` under ``cfg.clip_rule`` (module docstring)."""
    if cfg.clip_rule == "labelled":
        return labelled_clip_indices(track.labelled, cfg.clip_len, bool(rng.random() < cfg.random_slice_prob), rng)
    centre = choose_centre(len(track.members), track.labelled, cfg.clip_len, cfg.random_slice_prob, rng)  # "window"
    return clip_indices(len(track.members), centre, cfg.clip_len)


def _jitter(box: tuple[float, float, float, float], rng: np.random.Generator) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    dx1, dy1, dx2, dy2 = rng.uniform(-BOX_JITTER, BOX_JITTER, 4)
    x1, x2 = x1 + dx1 * w, x2 + dx2 * w
    y1, y2 = y1 + dy1 * h, y2 + dy2 * h
    return x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0)


def training_clip(patient: AnnotatedPatient, track: SeriesTrack, profile: Profile, rng: np.random.Generator, augment: bool = True) -> np.ndarray:
    """One (N, C, C) float32 clip of ``track`` built with wff.ensemble.crop, as the crop step does."""
    c = profile.classifier
    slices = patient.prepared.slices[track.members, 0]  # (n, S, S)
    indices = clip_slices(track, c, rng)
    box = _jitter(track.box, rng) if augment else track.box
    box = expand_box(box, c.crop_margin, profile.image.size)
    clip = crop_clip(slices, box, indices, c.crop_size)
    if augment:
        gamma = math.exp(rng.uniform(math.log(GAMMA_RANGE[0]), math.log(GAMMA_RANGE[1])))
        clip = np.power(np.clip(clip, 0.0, None), gamma) * rng.uniform(*INTENSITY_SCALE)
    return clip.astype(np.float32, copy=False)


def balanced_draws(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices into ``labels`` drawn so that each class present is drawn equally often in expectation."""
    classes, counts = np.unique(labels, return_counts=True)
    weight = 1.0 / counts[np.searchsorted(classes, labels)]
    return rng.choice(len(labels), size=n, replace=True, p=weight / weight.sum())


def fit_classifier(
    patients: Sequence[AnnotatedPatient],
    profile: Profile,
    epochs: int,
    device: str = "cpu",
    progress: Progress | None = None,
    seed: int = 0,
) -> ResNeXt3d:
    """Train :func:`build_classifier` (from scratch, or from ``classifier.weights``) on labelled-region clips; eval mode on ``device``.

    Clips are (B, 1, N, C, C) float32 batches; targets are the patients' labels (0 benign,
    1 malignant), cross-entropy on :meth:`ResNeXt3d.logits`. Every epoch draws
    ``clips_per_series`` clips per usable series, class-balanced, rounded up to whole
    batches (BatchNorm never sees a batch of one). ``progress`` as in :func:`fit_detector`.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    c = profile.classifier
    tracks = series_tracks(patients)
    if not tracks:
        raise ValueError("no series with labelled tumour boxes in the training patients; the classifier needs some")
    labels = np.array([t.label for t in tracks])
    draws = max(1, math.ceil(c.clips_per_series * len(tracks) / c.batch_size)) * c.batch_size
    total = capped_steps(epochs * draws // c.batch_size, profile)
    rng = np.random.default_rng(seed)

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        model = build_classifier(profile)
        init_pretrained(model, "classifier", profile)  # classifier.weights, when set
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total))

        def loss_fn(m: nn.Module, batch: Sequence[int]) -> dict[str, Tensor]:
            clips = np.stack([training_clip(patients[tracks[i].patient], tracks[i], profile, rng) for i in batch])  # (B, N, C, C)
            x = torch.from_numpy(clips).unsqueeze(1).to(device)  # (B, 1, N, C, C)
            y = torch.from_numpy(labels[np.asarray(batch)]).to(device)
            return {"loss_classifier": F.cross_entropy(m.logits(x), y)}

        step = 0
        for _ in range(epochs):
            order = balanced_draws(labels, draws, rng).tolist()
            step = train_one_epoch(model, optimizer, scheduler, _batched(order, c.batch_size), loss_fn, step, total, progress, "classifier")
    return model.eval()


__all__ = [
    "fit_detector",
    "fit_classifier",
    "train_one_epoch",
    "lr_factor",
    "detector_samples",
    "detector_epoch",
    "series_tracks",
    "choose_centre",
    "labelled_clip_indices",
    "clip_slices",
    "training_clip",
    "balanced_draws",
    "save_checkpoint",
    "load_detector",
    "load_classifier",
    "DetectorSample",
    "SeriesTrack",
]
