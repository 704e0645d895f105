"""Configuration: one source of truth, as frozen dataclasses.

Two named profiles share every key and differ only in values:

* ``small``: the CPU default. Light detector backbone, small 3D CNN, a few epochs; the
  whole demo (data, training, serving, evaluation) runs in about an hour on 2 cores.
* ``paper``: the method of Liu et al. 2022 (Insights into Imaging 13:87): ResNeXt101-32x8d
  with deformable convolutions and a five-scale FPN, a 3D ResNeXt-101 sequence classifier,
  four-fold cross-validation. Meant for a GPU.

The resolved profile is written next to every checkpoint and exported model
(``profile.json``), and read back by ``wff repo build`` and the serving steps, so a model
is never served with settings other than those it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LABELS = ("benign", "malignant")  # index = label id; malignant is the positive class
DETECTOR_CLASSES = ("background", "benign", "malignant")  # Faster R-CNN class ids; 0 is background
SEQUENCES = ("T1", "T2", "STIR")  # sagittal series types used by the paper (STIR ~ FS-T2WI)
LOCATIONS = ("cervical", "thoracic", "lumbar", "sacral")  # Table 2 of the paper
CLIP_RULES = ("window", "labelled")  # classifier.clip_rule values (training/engine.py)


@dataclass(frozen=True)
class ImageConfig:
    size: int = 256  # detector input is size x size (letterboxed, top-left anchored)
    clip_low: float = 0.5  # per-series intensity window: lower percentile -> 0
    clip_high: float = 99.5  # upper percentile -> 1


@dataclass(frozen=True)
class DetectorConfig:
    backbone: str = "resnet_small"  # "resnet_small" (CPU) | "resnext101_dcn" (paper)
    fpn_channels: int = 32  # channels of every FPN level (small: 32; at 64 the FPN and RPN head were 0.8 of 1.06 GFLOP/slice)
    fpn_levels: int = 4  # pyramid levels fed to RPN/RoI heads (paper: 5 scales, 1/4 .. 1/64)
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)  # one anchor size per FPN level, in pixels
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height/width ratios of the anchors
    rpn_pre_nms_top_n: int = 300  # proposals kept per image before RPN NMS (static graph)
    rpn_post_nms_top_n: int = 48  # proposals per image after RPN NMS (fixed RoI count R)
    rpn_nms_iou: float = 0.7
    box_nms_iou: float = 0.4  # class-agnostic NMS on final detections
    top_k: int = 8  # fixed number of detections per image in the exported graph (padded)
    roi_output_size: int = 7  # RoIAlign output (roi_output_size x roi_output_size)
    representation_size: int = 256  # width of the two-layer box head
    # small profile on the paper-size synthetic set (445 training patients, ~1,300 optimiser steps): on the
    # 120-patient set 10 epochs (same steps) were the best found, 16 over-fitted (BENCHMARKS.md)
    epochs: int = 3
    batch_size: int = 8
    lr: float = 0.01
    weight_decay: float = 1e-4
    cutmix_prob: float = 0.5  # MultiScale-SelfCutMix: chance per training image
    cutmix_scale: tuple[float, float] = (0.5, 1.0)  # width/height scale of the pasted tumour
    negatives_per_positive: float = 0.25  # slices without tumour mixed into detector training
    balanced_classes: bool = True  # draw tumour slices so benign and malignant come equally often
    # local torchvision resnext101_32x8d state dict for the resnext101_dcn backbone (docs/training.md); None: from scratch
    weights: str | None = None


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "resnext3d_small"  # "resnext3d_small" (CPU) | "resnext3d_101" (paper)
    width: int = 16  # channels of the stem (paper: 64)
    cardinality: int = 4  # groups of the ResNeXt bottlenecks (paper: 32)
    layers: tuple[int, ...] = (1, 1, 1, 1)  # bottleneck blocks per stage (paper: 3, 4, 23, 3)
    clip_len: int = 16  # N consecutive slices per clip (paper: 4, 8 or 16; 16 best)
    crop_size: int = 112  # every slice of a clip is crop_size x crop_size
    crop_margin: float = 0.15  # the region is grown by this fraction of its size on each side
    epochs: int = 5  # small profile, 445 training patients (~700 steps; 16 epochs on the 120-patient set was ~600)
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    clips_per_series: int = 2  # training clips drawn per series and epoch
    random_slice_prob: float = 0.5  # 50 % of clips from random tumour slices, else by DICOM index
    # which slices make a training clip (training/engine.py): "window" (N consecutive slices of the series around
    # a tumour slice, as served) | "labelled" (N of the labelled slices only, repeated when fewer: the paper's rule)
    clip_rule: str = "window"
    # local 3D ResNeXt state dict of the classifier's architecture (docs/training.md); None: from scratch
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.clip_rule not in CLIP_RULES:
            raise ValueError(f"classifier.clip_rule: {self.clip_rule!r} is not a clip rule; set one of {list(CLIP_RULES)}")


@dataclass(frozen=True)
class AgePriorConfig:
    edges: tuple[float, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80)  # group lower bounds, years
    alpha: float = 4.0  # pseudo-count pulling sparse groups towards the overall malignancy rate
    # groups with at least this many training patients take their raw rate, sparser ones are smoothed with alpha;
    # None: every group is smoothed
    min_patients: int | None = None
    balanced: bool = True  # A under equal class priors (the training set's class mix divided out)
    max_age: float = 120.0  # ages outside [0, max_age] are rejected

    def __post_init__(self) -> None:
        n = self.min_patients
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"age.min_patients: {self.min_patients!r} is not a patient count; set an integer >= 1, or null to smooth every group")


@dataclass(frozen=True)
class FusionConfig:
    weights: tuple[float, float, float] = (0.45, 0.45, 0.10)  # (l1 Det, l2 Seq, l3 Age); replaced by CV
    strategy: str = "Det-Seq-Age"  # the strategy served (one of fusion.STRATEGIES)
    det_threshold: float = 0.5  # slices whose best box scores below this do not vote (until CV chooses)
    # Cross-validation also chooses the voting threshold among these values (by the served strategy's
    # out-of-fold cv_metric; ties go to the value nearest det_threshold) and writes it to fusion.json;
    # the crop step keeps det_threshold for choosing its largest region, as the out-of-fold
    # components were made with it. Empty: slices vote at det_threshold.
    det_threshold_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    grid_step: float = 0.05  # step of the simplex grid searched by cross-validation
    # what the weight search maximises: "balanced_acc" (mean of SE, SP), "acc" (on the training set's class
    # mix) or "expected_acc" (prevalence x SE + (1 - prevalence) x SP: the accuracy expected where that
    # fraction of the patients is malignant)
    cv_metric: str = "balanced_acc"
    prevalence: float = 0.5  # malignant fraction of the population to be diagnosed; used by "expected_acc"
    # Eq. 1's image vote P >= t: cross-validation chooses t per strategy among these (0.5 alone: the paper's
    # "category with the larger probability")
    vote_threshold_grid: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class TrainConfig:
    cv_folds: int = 4  # folds of the training set used to choose l1, l2, l3 (paper: 4)
    cv_epoch_scale: float = 0.33  # fold models train for this fraction of the final epochs (rounded up)
    seed: int = 0
    num_threads: int = 2  # torch CPU threads
    max_steps: int = 0  # stop every fit after this many optimiser steps (0 = no cap; for smoke tests)
    # write each fold's detector and classifier checkpoints to folds/fold<k>/ (what the out-of-fold components
    # came from; wff train --detectors-from reuses the detectors)
    save_fold_models: bool = True


@dataclass(frozen=True)
class ServingConfig:
    max_batch_detector: int = 96  # >= slices of one patient (4 series x 21 slices = 84)
    max_batch_classifier: int = 8  # >= series of one patient
    preferred_batch_detector: tuple[int, ...] = (32, 64)
    preferred_batch_classifier: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000  # longest wait of the detector/classifier dynamic batcher for a fuller batch
    # Load shedding, in every step's queue (preprocess, detector, crop, classifier, fusion): a request that finds
    # max_queue_size requests already waiting, or that waits longer than queue_timeout_us, is rejected at once with
    # UNAVAILABLE ("Exceeds maximum queue size" / "Request timeout expired") instead of adding to every later patient's
    # latency; the client retries a few times, then reports the server overloaded. 0 = unbounded (Triton's default).
    max_queue_size: int = 64  # requests waiting per step, beyond those executing (>= wff bench's highest concurrency)
    queue_timeout_us: int = 30_000_000  # longest wait in one step's queue, in microseconds (client default timeout: 120 s)
    instances_detector: int = 2  # 2 cores: two detector instances beat one (wff bench, BENCHMARKS.md)
    instances_classifier: int = 1
    instances_python: int = 1  # preprocess, crop, fusion
    # intra-op threads of each CPU runtime session (per instance); 2 beat 1 at every concurrency (BENCHMARKS.md)
    runtime_threads: int = 2
    runtime: str = "openvino"  # embedded detector/classifier: "openvino" (~1.3x faster here) | "onnxruntime"
    runtime_precision: str = "f32"  # "f32" | "bf16" (OpenVINO only: bfloat16 arithmetic where the CPU has it; BENCHMARKS.md)
    # tritonserver's own allocator (its backend stubs keep glibc): "auto" (jemalloc when installed, else glibc) | "glibc" |
    # "jemalloc" | a library path; glibc's arenas made the server process grow for as long as the soak ran (BENCHMARKS.md)
    server_malloc: str = "auto"
    # jemalloc's options for tritonserver (MALLOC_CONF): freed pages go back to the system at once, from a
    # background thread, over two arenas; with jemalloc's defaults the process swung and drifted upwards under load
    # (BENCHMARKS.md, soak). Empty: jemalloc's defaults.
    server_malloc_conf: str = "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0,narenas:2"
    # glibc's tunables for the Python-backend stubs (GLIBC_TUNABLES): a fixed mmap threshold, so arrays of 1 MiB and
    # more go back to the system when freed instead of raising a heap that glibc cannot trim (with the dynamic
    # threshold the detector stubs grew in steps at each new peak), over two arenas (BENCHMARKS.md, soak). Empty:
    # glibc's defaults.
    stub_malloc_tunables: str = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.arena_max=2"
    # Python-backend shared-memory region of each instance, in largest patients (max_slices slices) it holds before
    # growing: regions never shrink, and under load grew from one patient's size to 2-3 (BENCHMARKS.md, soak)
    shm_patients: int = 4
    runtime_chunk: int = 16  # served detector/classifier: items per runtime call within one batch (bounds activation memory)
    max_files: int = 512  # request limits (files per patient, bytes, slices, pixels per slice)
    max_bytes: int = 512 * 1024 * 1024
    max_slices: int = 96
    max_pixels_per_slice: int = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    name: str = "small"
    image: ImageConfig = field(default_factory=ImageConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    age: AgePriorConfig = field(default_factory=AgePriorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def replace(self, **sections: Any) -> "Profile":
        """Copy with whole sections or section fields replaced: ``replace(detector={"epochs": 1})``."""
        updates = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if isinstance(value, dict):
                value = dataclasses.replace(current, **value)
            updates[name] = value
        return dataclasses.replace(self, **updates)


# Options removed because measurement showed no gain (docs/results.md), which profile.json files written before
# still hold: (section, key) -> (the values that leave the behaviour as it is now, dropped on load (None: any
# value); what the option did; what to do about a file holding another value).
REMOVED_KEYS: dict[tuple[str, str], tuple[tuple | None, str, str]] = {
    # fusion.json holds the calibration and ensemble.fusion refuses a calibrated one; the profile only recorded the choice
    ("fusion", "calibrate"): (None, "Platt calibration of D and M before Eq. 1", ""),
    ("serving", "members"): (
        ("final",),
        "serving the cross-validation fold models merged",
        "delete the key to serve the final models, then build the repository again (wff repo build)",
    ),
    ("serving", "members_box_iou"): (None, "the IoU at which the fold models' boxes were merged", ""),
}


def removed_key_note(section: str, key: str) -> str | None:
    """Why ``section.key`` is not a setting any more, or None when it never was one."""
    entry = REMOVED_KEYS.get((section, key))
    if entry is None:
        return None
    return f"{section}.{key} ({entry[1]}) was removed: no gain measured (docs/results.md)"


def _drop_removed_keys(section: str, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` without the removed keys that leave the behaviour unchanged; ValueError for any other value."""
    kept = dict(data)
    for (sec, key), (neutral, _, remedy) in REMOVED_KEYS.items():
        if sec != section or key not in kept:
            continue
        value = kept.pop(key)
        if neutral is not None and value not in neutral:
            raise ValueError(f"{where}: {key}={json.dumps(value)} is refused: {removed_key_note(section, key)}; {remedy}")
    return kept


def _section_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        default = getattr(cls(), key) if key in known else None
        kwargs[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return cls(**kwargs)


_SECTIONS = {
    "image": ImageConfig,
    "detector": DetectorConfig,
    "classifier": ClassifierConfig,
    "age": AgePriorConfig,
    "fusion": FusionConfig,
    "train": TrainConfig,
    "serving": ServingConfig,
}


def profile_from_dict(data: dict[str, Any], where: str = "profile") -> Profile:
    unknown = sorted(set(data) - set(_SECTIONS) - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown sections {unknown}; expected {sorted(_SECTIONS)}")
    sections = {
        k: _section_from_dict(cls, _drop_removed_keys(k, data.get(k, {}), f"{where}.{k}"), f"{where}.{k}")
        for k, cls in _SECTIONS.items()
    }
    return Profile(name=data.get("name", "custom"), **sections)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no profile.json here; train a model first (wff train)") from e
    return profile_from_dict(data, where=str(path))


SMALL = Profile()

PAPER = Profile(
    name="paper",
    image=ImageConfig(size=512),
    detector=DetectorConfig(
        backbone="resnext101_dcn",
        fpn_channels=256,
        fpn_levels=5,
        anchor_sizes=(32, 64, 128, 256, 512),
        rpn_pre_nms_top_n=1000,
        rpn_post_nms_top_n=300,
        top_k=32,
        representation_size=1024,
        epochs=24,
        batch_size=4,
        lr=0.01,
    ),
    classifier=ClassifierConfig(
        arch="resnext3d_101",
        width=64,
        cardinality=32,
        layers=(3, 4, 23, 3),
        epochs=40,
        batch_size=16,
        lr=1e-3,
        clip_rule="labelled",
    ),
    age=AgePriorConfig(min_patients=10, balanced=False),
    train=TrainConfig(cv_folds=4, cv_epoch_scale=1.0),
)

PROFILES: dict[str, Profile] = {"small": SMALL, "paper": PAPER}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}") from None
