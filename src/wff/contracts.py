"""Tensor contracts of every serving step, defined once.

The Triton configs (``wff repo build``), the Python-backend adapters, the ONNX exporter
(``input_names`` / ``output_names`` / ``dynamic_axes``), the gRPC client and the tests all
read names, dtypes and dims from here. Dims follow Triton's convention: for a batching step
(``max_batch_size > 0``) they exclude the batch dimension; ``-1`` is a variable dim.

Shapes that depend on the profile (detector input size S, detections per image K, clip
length N, crop size C) come from :func:`contracts_for`.

Data flow of the ``wff_diagnosis`` ensemble (one request = one patient)::

    DICOM_FILES, AGE_YEARS
      -> preprocess  (Python)   slices (S_total, 1, S, S), slice->series map, age, series info
      -> detector    (batching) boxes/scores/labels/malignancy (K per slice), count
      -> crop        (Python)   one clip (1, N, C, C) per series from its largest detection
      -> classifier  (batching) P(benign), P(malignant) per series
      -> fusion      (Python)   Eq. 1 per image, majority votes -> diagnosis and components
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wff.config import Profile

ENSEMBLE_NAME = "wff_diagnosis"

# Triton data type -> numpy dtype (BYTES tensors are numpy object arrays of bytes).
TRITON_TO_NUMPY = {"TYPE_FP32": np.float32, "TYPE_INT32": np.int32, "TYPE_STRING": np.object_}
# Triton config type -> the protocol's datatype string used by tritonclient.
TRITON_TO_WIRE = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_STRING": "BYTES"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config type: TYPE_FP32 | TYPE_INT32 | TYPE_STRING
    dims: tuple[int, ...]  # without the batch dim for batching steps; -1 = variable

    @property
    def numpy_dtype(self) -> type:
        return TRITON_TO_NUMPY[self.data_type]

    @property
    def wire_dtype(self) -> str:
        return TRITON_TO_WIRE[self.data_type]


@dataclass(frozen=True)
class StepContract:
    name: str  # Triton model name
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0 = one request is one patient; > 0 = Triton batches along dim 0

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.name)


def _by_name(specs: tuple[TensorSpec, ...], name: str, step: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"step {step!r} has no tensor {name!r}; it has {[s.name for s in specs]}")


F, I, B = "TYPE_FP32", "TYPE_INT32", "TYPE_STRING"


@dataclass(frozen=True)
class Contracts:
    """All step contracts and the ensemble wiring for one profile."""

    preprocess: StepContract
    detector: StepContract
    crop: StepContract
    classifier: StepContract
    fusion: StepContract
    ensemble: StepContract
    # (step, {step input: ensemble tensor}, {step output: ensemble tensor}) in execution order.
    wiring: tuple[tuple[str, dict[str, str], dict[str, str]], ...]

    @property
    def steps(self) -> tuple[StepContract, ...]:
        return (self.preprocess, self.detector, self.crop, self.classifier, self.fusion)

    def step(self, name: str) -> StepContract:
        for s in self.steps + (self.ensemble,):
            if s.name == name:
                return s
        raise KeyError(f"no step {name!r}; steps are {[s.name for s in self.steps]}")


def contracts_for(profile: Profile) -> Contracts:
    S = profile.image.size
    K = profile.detector.top_k
    N = profile.classifier.clip_len
    C = profile.classifier.crop_size
    sv = profile.serving

    preprocess = StepContract(
        "preprocess",
        inputs=(
            TensorSpec("preprocess_dicom", B, (-1,)),  # one element per DICOM file (Part 10 bytes)
            TensorSpec("preprocess_age", F, (-1,)),  # [] = unknown, [age] in years
        ),
        outputs=(
            TensorSpec("preprocess_slices", F, (-1, 1, S, S)),  # all used slices, series after series
            TensorSpec("preprocess_slice_series", I, (-1,)),  # series index of each slice
            TensorSpec("preprocess_age_years", F, (1,)),  # age used; NaN = none known
            TensorSpec("preprocess_series_info", B, (-1,)),  # JSON per used series (no identifiers)
            TensorSpec("preprocess_notes", B, (1,)),  # JSON: skipped series and why, age source
        ),
        max_batch_size=0,
    )
    detector = StepContract(
        "detector",
        inputs=(TensorSpec("detector_image", F, (1, S, S)),),  # [0, 1] intensities, letterboxed
        outputs=(
            TensorSpec("detector_boxes", F, (K, 4)),  # x1, y1, x2, y2 in input pixels, score order
            TensorSpec("detector_scores", F, (K,)),  # 1 - P(background); 0 for padding
            TensorSpec("detector_labels", I, (K,)),  # 1 benign, 2 malignant, 0 padding
            TensorSpec("detector_malignancy", F, (K,)),  # P(malignant) / (P(benign) + P(malignant))
            TensorSpec("detector_count", I, (1,)),  # valid detections (the rest is padding)
        ),
        max_batch_size=sv.max_batch_detector,
    )
    crop = StepContract(
        "crop",
        inputs=(
            TensorSpec("crop_slices", F, (-1, 1, S, S)),
            TensorSpec("crop_slice_series", I, (-1,)),
            TensorSpec("crop_boxes", F, (-1, K, 4)),
            TensorSpec("crop_scores", F, (-1, K)),
            TensorSpec("crop_count", I, (-1, 1)),
        ),
        outputs=(
            TensorSpec("crop_clips", F, (-1, 1, N, C, C)),  # one clip per series
            TensorSpec("crop_regions", F, (-1, 5)),  # per series: centre slice (series-local), x1, y1, x2, y2
        ),
        max_batch_size=0,
    )
    classifier = StepContract(
        "classifier",
        inputs=(TensorSpec("classifier_clip", F, (1, N, C, C)),),
        outputs=(TensorSpec("classifier_probs", F, (2,)),),  # P(benign), P(malignant)
        max_batch_size=sv.max_batch_classifier,
    )
    fusion = StepContract(
        "fusion",
        inputs=(
            TensorSpec("fusion_scores", F, (-1, K)),
            TensorSpec("fusion_boxes", F, (-1, K, 4)),
            TensorSpec("fusion_malignancy", F, (-1, K)),
            TensorSpec("fusion_count", I, (-1, 1)),
            TensorSpec("fusion_slice_series", I, (-1,)),
            TensorSpec("fusion_series_probs", F, (-1, 2)),
            TensorSpec("fusion_age_years", F, (1,)),
        ),
        outputs=(
            TensorSpec("fusion_diagnosis", B, (1,)),  # b"benign" | b"malignant"
            TensorSpec("fusion_p_malignant", F, (1,)),  # patient-level score (mean image P)
            TensorSpec("fusion_series_votes", I, (-1,)),  # 1 malignant, 0 benign, per series
            TensorSpec("fusion_series_m", F, (-1,)),  # M: sequence classifier P(malignant) per series
            TensorSpec("fusion_slice_d", F, (-1,)),  # D: best box P(malignant) per slice; NaN = no box
            TensorSpec("fusion_slice_score", F, (-1,)),  # best box score per slice (0 = no box)
            TensorSpec("fusion_slice_box", F, (-1, 4)),  # best box per slice, detector pixels
            TensorSpec("fusion_age_a", F, (1,)),  # A: P(malignant | age); NaN = no age term
        ),
        max_batch_size=0,
    )
    ensemble = StepContract(
        ENSEMBLE_NAME,
        inputs=(TensorSpec("DICOM_FILES", B, (-1,)), TensorSpec("AGE_YEARS", F, (-1,))),
        outputs=(
            TensorSpec("DIAGNOSIS", B, (1,)),
            TensorSpec("P_MALIGNANT", F, (1,)),
            TensorSpec("SERIES_VOTES", I, (-1,)),
            TensorSpec("SERIES_M", F, (-1,)),
            TensorSpec("SERIES_INFO", B, (-1,)),
            TensorSpec("SERIES_REGIONS", F, (-1, 5)),
            TensorSpec("SLICE_D", F, (-1,)),
            TensorSpec("SLICE_SCORE", F, (-1,)),
            TensorSpec("SLICE_BOX", F, (-1, 4)),
            TensorSpec("SLICE_SERIES", I, (-1,)),
            TensorSpec("AGE_A", F, (1,)),
            TensorSpec("AGE_USED", F, (1,)),
            TensorSpec("NOTES", B, (1,)),
        ),
        max_batch_size=0,
    )
    wiring = (
        (
            "preprocess",
            {"preprocess_dicom": "DICOM_FILES", "preprocess_age": "AGE_YEARS"},
            {
                "preprocess_slices": "slices",
                "preprocess_slice_series": "SLICE_SERIES",
                "preprocess_age_years": "AGE_USED",
                "preprocess_series_info": "SERIES_INFO",
                "preprocess_notes": "NOTES",
            },
        ),
        (
            "detector",
            {"detector_image": "slices"},
            {
                "detector_boxes": "boxes",
                "detector_scores": "scores",
                "detector_malignancy": "malignancy",
                "detector_count": "count",
            },
        ),
        (
            "crop",
            {
                "crop_slices": "slices",
                "crop_slice_series": "SLICE_SERIES",
                "crop_boxes": "boxes",
                "crop_scores": "scores",
                "crop_count": "count",
            },
            {"crop_clips": "clips", "crop_regions": "SERIES_REGIONS"},
        ),
        ("classifier", {"classifier_clip": "clips"}, {"classifier_probs": "series_probs"}),
        (
            "fusion",
            {
                "fusion_scores": "scores",
                "fusion_boxes": "boxes",
                "fusion_malignancy": "malignancy",
                "fusion_count": "count",
                "fusion_slice_series": "SLICE_SERIES",
                "fusion_series_probs": "series_probs",
                "fusion_age_years": "AGE_USED",
            },
            {
                "fusion_diagnosis": "DIAGNOSIS",
                "fusion_p_malignant": "P_MALIGNANT",
                "fusion_series_votes": "SERIES_VOTES",
                "fusion_series_m": "SERIES_M",
                "fusion_slice_d": "SLICE_D",
                "fusion_slice_score": "SLICE_SCORE",
                "fusion_slice_box": "SLICE_BOX",
                "fusion_age_a": "AGE_A",
            },
        ),
    )
    return Contracts(preprocess, detector, crop, classifier, fusion, ensemble, wiring)
